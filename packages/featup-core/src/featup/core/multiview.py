"""The multi-view reconstruction objective shared by every trainer (paper Section 3, eq. 1).

One training step, whatever is trained: draw jitters ``t`` (:func:`draw_jitters`), take the frozen
backbone's features of the jittered views ``f(t(x))`` (:func:`view_features`), render high-resolution
features ``F_hr`` with the upsampler, pool ``t(F_hr)`` back with the learned downsampler
(:func:`loss_modules`), score the two with eq. 1's Gaussian likelihood (:func:`view_loss`) and step the
optimiser (:func:`optimizer_step`) inside one loop (:func:`run_steps`). The trainers,
:mod:`featup.core.jbu_training` (``train_jbu``) and :mod:`featup.core.implicit_fit` (``fit_implicit``),
differ in what the upsampler is and how the views are batched; everything else is here.

Reproducibility: every random draw comes from a seed derived from ``(seed, rank, step)``
(:func:`featup.core._train_data.derive_seed`) inside :func:`training_context` (a ``fork_rng``): the
caller's generators are untouched, the same seed gives bitwise-identical parameters on the CPU, and a run
resumed from a checkpoint ends where the uninterrupted run does.

Precision: ``"bfloat16"`` / ``"float16"`` run the forward passes under ``torch.autocast``; parameters and
optimiser state stay float32, the loss is computed in float32, and float16 scales it with a ``GradScaler``
(:mod:`featup.core.precision`).

``sample_jitter``, ``reconstruction_loss``, ``create_downsampler`` and ``make_grad_scaler`` are read from
this module's namespace when called, so patching them here (or on :mod:`featup.core.training`, which
forwards the patch) reaches every trainer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from featup.core import _distributed as dist_utils
from featup.core._train_state import (
    check_hparams,
    check_precision,
    load_train_state,
    restore_grad_scaler,
    restore_modules,
    restore_optimizer,
    save_train_state,
)
from featup.core.downsamplers import create_downsampler
from featup.core.jitter import JitterParams, sample_jitter
from featup.core.losses import UncertaintyHead, project, reconstruction_loss
from featup.core.precision import full_precision, make_grad_scaler, mixed_precision, to_float32

__all__ = [
    "PATCHABLE",
    "Callback",
    "backbone_features",
    "check_callables",
    "check_finite_features",
    "check_finite_loss",
    "create_downsampler",
    "draw_jitters",
    "forked_devices",
    "frozen",
    "load_run",
    "loss_modules",
    "make_grad_scaler",
    "optimizer_step",
    "reconstruction_loss",
    "resolve_device",
    "restore_run",
    "run_steps",
    "sample_jitter",
    "save_run",
    "seed_rngs",
    "step_logs",
    "training_context",
    "view_features",
    "view_loss",
]

#: callback(step, logs) after every completed step; ``step`` counts completed steps (1-based) and ``logs``
#: holds floats ("loss", "rec_loss", "tv_loss", ...). Returning True stops training after that step.
Callback = Callable[[int, dict[str, float]], Any]

#: the names the trainers look up here at call time (tests and tools/sweep_train_jbu.py patch them)
PATCHABLE = ("sample_jitter", "reconstruction_loss", "create_downsampler", "make_grad_scaler")


# ----------------------------------------------------------------------------------------------------------
# inputs, device, RNG


def check_callables(backbone: object, callback: object) -> None:
    """Raise TypeError unless ``backbone`` is callable and ``callback`` is callable or None."""
    if not callable(backbone):
        raise TypeError(
            f"expected backbone as a callable (B,3,H,W) -> (B,C,h,w), got {type(backbone).__name__}"
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"expected callback as callable(step, logs) or None, got {type(callback).__name__}")


def resolve_device(backbone: object, device: torch.device | str | None) -> torch.device:
    """The training device: given, else the backbone's parameters' device, else torchrun's local default."""
    backbone_device = None
    if isinstance(backbone, nn.Module):
        tensor = next(iter(backbone.parameters()), None)
        if tensor is None:
            tensor = next(iter(backbone.buffers()), None)
        backbone_device = tensor.device if tensor is not None else None
    if device is None:
        return backbone_device if backbone_device is not None else dist_utils.default_device()
    device = torch.device(device)
    if backbone_device is not None and backbone_device.type != device.type:
        raise ValueError(
            f"expected the backbone on the training device {device}, "
            f"but its parameters are on {backbone_device}"
        )
    return device


@contextmanager
def frozen(backbone: object):
    """Run the backbone in eval mode (no dropout, BatchNorm statistics frozen); restore its mode after."""
    was_training = isinstance(backbone, nn.Module) and backbone.training
    if was_training:
        backbone.eval()  # type: ignore[union-attr]
    try:
        yield
    finally:
        if was_training:
            backbone.train()  # type: ignore[union-attr]


@contextmanager
def training_context(device: torch.device):
    """Fork the global RNGs (the seeding done by training never leaks to the caller) and make sure autograd
    is on, even when the caller sits inside ``torch.no_grad`` or ``torch.inference_mode``."""
    with (
        torch.random.fork_rng(devices=forked_devices(device)),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


def seed_rngs(seed: int, device: torch.device) -> None:
    """Seed only the generators a run on ``device`` draws from: the CPU's and, on CUDA, that device's.

    ``torch.manual_seed`` would also seed every other CUDA device (or queue that seeding until CUDA starts),
    which ``fork_rng`` then may not restore: the caller's generators would change.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def forked_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state ``fork_rng`` must save: every initialised one, and the training one."""
    devices: set[int] = set()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.update(range(torch.cuda.device_count()))
    if device.type == "cuda":
        devices.add(device.index if device.index is not None else torch.cuda.current_device())
    return sorted(devices)


# ----------------------------------------------------------------------------------------------------------
# views -> backbone


def draw_jitters(
    gen: torch.Generator, n: int, *, max_pad: int, max_zoom: float, p_zoom: float, p_flip: float
) -> list[JitterParams]:
    """``n`` jitters drawn one after the other from ``gen`` (see :func:`featup.core.jitter.sample_jitter`)."""
    return [
        sample_jitter(gen, max_pad=max_pad, max_zoom=max_zoom, p_zoom=p_zoom, p_flip=p_flip) for _ in range(n)
    ]


def backbone_features(backbone: Callable, images: torch.Tensor, what: str) -> torch.Tensor:
    """Call the frozen backbone under ``no_grad`` and check it returned finite (B,C,h,w) floats.

    Raises:
        TypeError, ValueError: not a tensor, the wrong shape or dtype, or NaN/inf values (``what`` names the
        call in the message).
    """
    with torch.no_grad():
        feats = backbone(images)
    if not isinstance(feats, torch.Tensor):
        raise TypeError(
            f"expected the backbone to return a tensor (B,C,h,w), got {type(feats).__name__} ({what})"
        )
    if feats.dim() != 4 or feats.shape[0] != images.shape[0] or feats.numel() == 0:
        raise ValueError(
            f"expected the backbone to return features (B,C,h,w) with B={images.shape[0]} for images "
            f"{tuple(images.shape)}, got shape {tuple(feats.shape)} ({what})"
        )
    if not feats.is_floating_point():
        raise ValueError(f"expected floating-point backbone features, got dtype {feats.dtype} ({what})")
    return check_finite_features(feats.detach(), what)


def view_features(backbone: Callable, images: torch.Tensor, precision: str, what: str) -> torch.Tensor:
    """:func:`backbone_features` under the run's ``precision``, returned as float32. (B,3,H,W) -> (B,C,h,w)."""
    with mixed_precision(precision, images.device):
        return to_float32(backbone_features(backbone, images, what))


def check_finite_features(feats: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ValueError when backbone features hold NaN or infinity (they would poison every parameter)."""
    if not bool(torch.isfinite(feats).all()):
        n_bad = int((~torch.isfinite(feats)).sum())
        raise ValueError(
            f"expected finite backbone features, got {n_bad} NaN/inf values of {feats.numel()} ({what}); "
            "nothing was trained or written on them"
        )
    return feats


# ----------------------------------------------------------------------------------------------------------
# downsampler -> loss


def loss_modules(
    kind: str, dim: int, kernel_size: int, *, blur: bool = False, uncertainty: bool = True
) -> tuple[nn.Module, UncertaintyHead | None]:
    """The learned downsampler and eq. 1's per-pixel scale head (None: plain mean squared error), built in
    that order (the order fixes their initialisation under a seed)."""
    down = create_downsampler(kind, dim, kernel_size, blur=blur)
    head = UncertaintyHead(dim) if uncertainty else None
    return down, head


def view_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    log_scale: torch.Tensor | None,
    proj: torch.Tensor | None = None,
    *,
    pred_projected: bool = False,
) -> torch.Tensor:
    """eq. 1 between pooled predictions ``down(t(F_hr))`` and targets ``f(t(x))``, always in float32.

    With ``proj`` both sides are first projected to its ``D`` columns (the prediction only when it is not
    ``pred_projected`` already); ``log_scale`` is the head's output on the unprojected targets.

    Shape:
        - pred: (B, C or D, h, w); target: (B, C, h, w); log_scale: (B, 1, h, w) or None; proj: (C, D)
        - output: scalar
    """
    with full_precision(target.device):
        pred, target = to_float32(pred), to_float32(target)
        log_scale = to_float32(log_scale) if log_scale is not None else None
        if proj is not None:
            if not pred_projected:
                pred = project(pred, proj)
            target = project(target, proj)
        return reconstruction_loss(pred, target, log_scale)


def check_finite_loss(
    loss: torch.Tensor,
    step: int,
    ctx: dist_utils.DistContext | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise FloatingPointError before the backward pass, the optimizer step and any checkpoint when the
    loss is NaN/inf.

    Under torchrun every rank learns that some rank failed, so none waits forever in the gradient all-reduce.
    """
    bad = not bool(torch.isfinite(loss.detach()))
    if ctx is not None and device is not None:
        bad = dist_utils.any_true(bad, ctx, device)
    if bad:
        raise FloatingPointError(
            f"non-finite training loss ({float(loss.detach())}) at step {step + 1}: the parameters were not "
            "updated and nothing was written for this step (lower lr, or check the images and the backbone)"
        )


# ----------------------------------------------------------------------------------------------------------
# optimiser step, loop, checkpoint


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor, lr: float
) -> None:
    """Set every group's rate to ``lr`` times its ``lr_scale`` (1 if absent), then one (scaled) update."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # scale/step/update are plain backward/step unless float16
    scaler.step(optimizer)
    scaler.update()


def step_logs(**values: torch.Tensor | float) -> dict[str, float]:
    """The values a callback receives, as Python floats."""
    return {k: float(v) for k, v in values.items()}


def run_steps(
    step_fn: Callable[[int], dict[str, float]],
    start: int,
    steps: int,
    *,
    save: Callable[[int], None],
    checkpoint_every: int,
    callback: Callback | None,
    progress: bool,
    desc: str,
    agree: Callable[[bool], bool] | None = None,
) -> int:
    """Run ``step_fn(step) -> logs`` for the 0-based steps ``start .. steps - 1``; return the steps completed.

    After each step: the tqdm bar, ``callback(step, logs)`` (True stops; ``agree`` turns one rank's wish
    into every rank's), and ``save(step)`` every ``checkpoint_every`` steps, at the last one and on a stop.
    """
    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc=desc)
    step = start
    try:
        while step < steps:
            logs = step_fn(step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}")
            stop = bool(callback(step, logs)) if callback is not None else False
            if callback is not None and agree is not None:
                stop = agree(stop)
            if step % checkpoint_every == 0 or step == steps or stop:
                save(step)
            if stop:
                break
    finally:
        bar.close()
    return step


def load_run(
    path: str | os.PathLike,
    kind: str,
    hparams: dict[str, Any],
    precision: str,
    device: torch.device,
    legacy: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a resumable state and check it belongs to this run.

    ``legacy`` holds the values of settings the state may predate (what such runs were trained with).

    Raises:
        CheckpointError: another kind of run, other run-defining settings, or another precision.
    """
    saved = load_train_state(path, kind, map_location=device)
    check_hparams({**legacy, **saved[1]["hparams"]}, hparams, path)
    check_precision(saved[1], precision, path)
    return saved


def restore_run(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    path: str | os.PathLike,
) -> int:
    """Load the modules, optimizer and gradient scaler from ``saved``; return its completed step count."""
    restore_modules(saved[0], modules, path)  # type: ignore[arg-type]
    restore_optimizer(optimizer, saved[0], saved[1], path)  # type: ignore[arg-type]
    restore_grad_scaler(scaler, saved[1], path)  # type: ignore[arg-type]
    return int(saved[1]["step"])


def save_run(
    path: str | os.PathLike,
    kind: str,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    precision: str,
    config: dict[str, Any],
) -> None:
    """Write the resumable state: ``config`` plus the precision and the gradient scaler's state."""
    save_train_state(
        path,
        kind=kind,
        step=step,
        modules=modules,
        optimizer=optimizer,
        config={**config, "precision": precision, "grad_scaler": scaler.state_dict()},
    )
