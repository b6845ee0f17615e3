"""Training FeatUp upsamplers with the multi-view reconstruction loss (paper Section 3, Table 7).

Both entry points optimise eq. 1: for each jitter ``t`` the frozen backbone's features of the jittered image,
``f(t(x))``, are compared with the learned downsampler applied to the jittered high-resolution features,
``down(t(F_hr))``, under a Gaussian likelihood whose per-pixel scale a small head predicts from ``f(t(x))``.

- :func:`train_jbu` learns a :class:`~featup.core.jbu.JBUStack` (``F_hr = JBU(f(x), x)``) over an image
  corpus; predictions and targets are projected to ``proj_dim`` random dimensions each step
  (Johnson-Lindenstrauss), and it runs data-parallel under ``torchrun``.
- :func:`fit_implicit` fits a per-image :class:`~featup.core.implicit.ImplicitUpsampler` on the top PCA
  components of the image's features, with a total-variation prior on feature magnitudes (eq. 8).

Reproducibility: every random draw (data order, jitters, projections, dropout, initialisation) comes from
a seed derived from ``(seed, rank, step)``, inside ``torch.random.fork_rng`` so the caller's global RNG is
untouched. The same seed gives bitwise-identical parameters on the CPU, and a run interrupted after a
checkpoint and resumed ends exactly where the uninterrupted run does.

Precision: ``precision="bfloat16"`` or ``"float16"`` runs each step's forward passes (backbone, upsampler,
downsampler, uncertainty head) under ``torch.autocast`` on the training device; parameters and optimizer
state stay float32, the loss is computed in float32 from outputs cast up, and float16 scales the loss with a
``GradScaler`` (:mod:`featup.core.precision`). The precision (and the loss scale) is part of the checkpoint,
and resuming in another precision is refused.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from featup.core import _distributed as dist_utils
from featup.core._train_data import derive_seed, make_source, validate_images
from featup.core._train_state import (
    check_hparams,
    check_precision,
    load_train_state,
    restore_grad_scaler,
    restore_modules,
    restore_optimizer,
    save_train_state,
)
from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError
from featup.core.downsamplers import create_downsampler
from featup.core.jbu import JBUStack
from featup.core.jitter import JitterParams, apply_jitter, sample_jitter
from featup.core.losses import UncertaintyHead, project, random_projection, reconstruction_loss
from featup.core.precision import (
    check_training_precision,
    full_precision,
    make_grad_scaler,
    mixed_precision,
    to_float32,
)

__all__ = ["fit_implicit", "train_jbu"]  # noqa: F822 (fit_implicit: see __getattr__)

#: callback(step, logs) after every completed step; ``step`` counts completed steps (1-based) and ``logs``
#: holds floats ("loss", "rec_loss", "tv_loss"). Returning True stops training after that step.
Callback = Callable[[int, dict[str, float]], Any]

JBU_STATE_FILE = "train_state.safetensors"
JBU_MODEL_FILE = "jbu_stack.safetensors"


# ----------------------------------------------------------------------------------------------------------
# argument checks shared by both entry points


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} as an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: object, minimum: float, *, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"expected {name} as a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"expected {name} {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _check_probability(name: str, value: object) -> float:
    value = _check_float(name, value, 0.0)
    if value > 1.0:
        raise ValueError(f"expected {name} in [0, 1], got {value}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} as True or False, got {value!r}")
    return value


def _with_hparam_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """States saved before ``p_zoom`` / ``p_flip`` / ``uncertainty`` existed were trained with the Table 7
    values (0.5, 0.5) and with the uncertainty head."""
    return {"p_zoom": 0.5, "p_flip": 0.5, "uncertainty": True, **saved}


def _uncertainty_head(enabled: bool, dim: int) -> UncertaintyHead | None:
    """eq. 1's per-pixel scale head, or None for a plain mean squared error (``uncertainty=False``)."""
    return UncertaintyHead(dim) if enabled else None


def _check_common(
    backbone: object,
    steps: object,
    n_jitters: object,
    lr: object,
    kernel_size: object,
    max_pad: object,
    max_zoom: object,
    downsampler: object,
    seed: object,
    checkpoint_every: object,
    callback: object,
) -> None:
    if not callable(backbone):
        raise TypeError(
            f"expected backbone as a callable (B,3,H,W) -> (B,C,h,w), got {type(backbone).__name__}"
        )
    _check_int("steps", steps, 1)
    _check_int("n_jitters", n_jitters, 1)
    _check_float("lr", lr, 0.0, strict=True)
    _check_int("kernel_size", kernel_size, 1)
    _check_int("max_pad", max_pad, 0)
    _check_float("max_zoom", max_zoom, 1.0)
    if downsampler not in ("simple", "attention"):
        raise ValueError(f"expected downsampler 'simple' or 'attention', got {downsampler!r}")
    _check_int("seed", seed, 0)
    _check_int("checkpoint_every", checkpoint_every, 1)
    if callback is not None and not callable(callback):
        raise TypeError(f"expected callback as callable(step, logs) or None, got {type(callback).__name__}")


def _resolve_device(backbone: object, device: torch.device | str | None) -> torch.device:
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
def _frozen(backbone: object):
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
def _training_context(device: torch.device):
    """Fork the global RNGs (the seeding done by training never leaks to the caller) and make sure autograd
    is on, even when the caller sits inside ``torch.no_grad`` or ``torch.inference_mode``."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        yield


def _features(backbone: Callable, images: torch.Tensor, what: str) -> torch.Tensor:
    """Call the frozen backbone and check it returned (B,C,h,w) floats for the B images."""
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
    return feats.detach()


def _step_logs(**values: torch.Tensor | float) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------
# JBU


class _JBUObjective(nn.Module):
    """Every trainable piece of JBU training behind one forward, so DistributedDataParallel sees one module.

    ``forward`` returns eq. 1 averaged over the jitters: ``F_hr = up(f(x), x)`` once, then for each jitter
    the projected ``down(t(F_hr))`` against the projected ``f(t(x))`` with log-scales from ``head(f(t(x)))``.
    """

    def __init__(self, upsampler: nn.Module, downsampler: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.downsampler = downsampler
        self.head = head

    def forward(
        self,
        image: torch.Tensor,
        lr_feats: torch.Tensor,
        jitters: list[list[JitterParams]],
        targets: list[torch.Tensor],
        proj: torch.Tensor | None,
    ) -> torch.Tensor:
        hr = self.upsampler(lr_feats, image)
        total = hr.new_zeros(())
        for params, target in zip(jitters, targets):
            down = self.downsampler(apply_jitter(hr, params), tuple(target.shape[-2:]))
            log_scale = self.head(target) if self.head is not None else None
            # under mixed precision the loss (projection included) is still computed in float32
            with full_precision(hr.device):
                down, target = to_float32(down), to_float32(target)
                log_scale = to_float32(log_scale) if log_scale is not None else None
                if proj is not None:
                    down, target = project(down, proj), project(target, proj)
                total = total + reconstruction_loss(down, target, log_scale)
        return total / len(targets)


def _saved_kwargs(upsampler: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A saved upsampler config with the values of options it predates filled in (see ``kwargs_from_config``)."""
    complete = getattr(type(upsampler), "kwargs_from_config", None)
    return complete(kwargs) if complete is not None else kwargs


def train_jbu(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | Iterable[torch.Tensor],
    steps: int = 2000,
    *,
    upsampler: Upsampler | None = None,
    batch_size: int = 4,
    n_jitters: int = 2,
    lr: float = 1e-3,
    proj_dim: int | None = 30,
    downsampler: str = "attention",
    kernel_size: int = 16,
    max_pad: int = 30,
    max_zoom: float = 2.0,
    p_zoom: float = 0.5,
    p_flip: float = 0.5,
    uncertainty: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: str = "float32",
    callback: Callback | None = None,
) -> Upsampler:
    """Train a JBU upsampler for a frozen backbone with FeatUp's multi-view loss (Table 7 defaults).

    Each step takes a batch of images ``x``, computes ``F_hr = up(f(x), x)`` and, for ``n_jitters`` jitters
    per image (pad up to ``max_pad`` px at 224 px, zoom up to ``max_zoom``, crop, flip; drawn independently
    per image), minimises eq. 1 between ``f(t(x))`` and ``down(t(F_hr))`` after a fresh random projection
    to ``proj_dim`` dimensions; the uncertainty head reads the full-dimensional ``f(t(x))``. NAdam, no TV.

    Under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) the process group is initialised if needed (NCCL on
    CUDA, gloo on CPU), the trainable modules are wrapped in ``DistributedDataParallel``, each rank reads a
    different shard of the corpus, and only rank 0 writes checkpoints while the others wait at a barrier.

    Args:
        backbone: frozen feature extractor, any callable ``(B,3,H,W) -> (B,C,h,w)``; called under
            ``torch.no_grad`` (an ``nn.Module`` is put in eval mode for the run and restored afterwards).
        images: RGB in [0, 1]: a tensor ``(N,3,H,W)`` (read in a seeded, per-epoch shuffled order), a
            map-style ``Dataset`` of ``(3,H,W)`` tensors (or ``(image, label)`` pairs), or any re-iterable of
            ``(B,3,H,W)`` batches such as a list or ``DataLoader`` (cycled; its batches set the batch size).
        steps: total optimiser steps (a resumed run continues up to this count).
        upsampler: the module to train in place and return; default a fresh encoder-agnostic
            ``JBUStack()`` (or the one stored in the checkpoint being resumed).
        batch_size: images per step and rank for tensor / Dataset inputs.
        n_jitters: jittered views per image per step.
        lr: NAdam learning rate.
        proj_dim: random projection width; None compares full features.
        downsampler: "attention" (eq. 2) or "simple" (learned blur).
        kernel_size: downsampler kernel size.
        max_pad: jitter padding in pixels at 224 px (scaled with the image size).
        max_zoom: largest jitter zoom.
        p_zoom: probability that a jitter zooms (else zoom 1).
        p_flip: probability that a jitter flips horizontally. 0 for a backbone whose features are not
            flip-equivariant (e.g. oriented filters: a flip swaps their orientation channels, so no
            high-res map explains both views).
        uncertainty: learn eq. 1's per-pixel scale (the paper); False compares the views with a plain mean
            squared error, which does not let hard pixels (object boundaries) be explained away as noise.
            With the scale, keep ``lr`` moderate: on the synthetic benchmark the default stack trained
            normally at 5e-3 and 1e-2 and degraded at 2e-2 (see ``featup.eval.benchmark.BenchConfig``).
        seed: seed of every random draw.
        checkpoint_dir: folder for ``train_state.safetensors`` (full resumable state: all modules, optimizer,
            step) and, at the end, ``jbu_stack.safetensors`` (``JBUStack.load``-able); None disables both.
        checkpoint_every: steps between checkpoints (one is also written after the last step).
        resume: continue from ``checkpoint_dir``'s state if present; its run hyperparameters must match.
        progress: show a tqdm bar (rank 0 only).
        device: training device; default the backbone's parameter device (or torchrun's local CUDA device,
            or CPU). The backbone must already live there.
        precision: "float32", "bfloat16" or "float16": the autocast dtype of each step's forward passes
            (backbone, upsampler, downsampler, head) on ``device``. Parameters and optimizer state stay
            float32, the loss is computed in float32, and float16 uses a ``GradScaler``. Stored in the
            checkpoint: resuming with another precision raises :class:`CheckpointError`.
        callback: ``callback(step, logs)`` after each step; returning True stops training early.

    Returns:
        The trained upsampler in eval mode, on ``device``.

    Shape:
        - images: (N, 3, H, W) or batches (B, 3, H, W), RGB in [0, 1]
        - backbone output: (B, C, h, w)
    """
    _check_common(
        backbone,
        steps,
        n_jitters,
        lr,
        kernel_size,
        max_pad,
        max_zoom,
        downsampler,
        seed,
        checkpoint_every,
        callback,
    )
    _check_int("batch_size", batch_size, 1)
    check_training_precision(precision)
    _check_probability("p_zoom", p_zoom)
    _check_probability("p_flip", p_flip)
    _check_bool("uncertainty", uncertainty)
    if proj_dim is not None:
        _check_int("proj_dim", proj_dim, 1)
    if upsampler is not None and not isinstance(upsampler, nn.Module):
        raise TypeError(
            f"expected upsampler as an nn.Module (e.g. JBUStack) or None, got {type(upsampler).__name__}"
        )
    device = _resolve_device(backbone, device)
    ctx = dist_utils.setup(device)
    try:
        with _frozen(backbone), _training_context(device):
            return _train_jbu(
                backbone,
                images,
                steps,
                upsampler=upsampler,
                batch_size=batch_size,
                n_jitters=n_jitters,
                lr=lr,
                proj_dim=proj_dim,
                downsampler=downsampler,
                kernel_size=kernel_size,
                max_pad=max_pad,
                max_zoom=max_zoom,
                p_zoom=float(p_zoom),
                p_flip=float(p_flip),
                uncertainty=uncertainty,
                seed=seed,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                resume=resume,
                progress=progress,
                device=device,
                precision=precision,
                callback=callback,
                ctx=ctx,
            )
    finally:
        dist_utils.teardown(ctx)


def _train_jbu(
    backbone: Callable,
    images: object,
    steps: int,
    *,
    upsampler: nn.Module | None,
    batch_size: int,
    n_jitters: int,
    lr: float,
    proj_dim: int | None,
    downsampler: str,
    kernel_size: int,
    max_pad: int,
    max_zoom: float,
    p_zoom: float,
    p_flip: float,
    uncertainty: bool,
    seed: int,
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int,
    resume: bool,
    progress: bool,
    device: torch.device,
    precision: str,
    callback: Callback | None,
    ctx: dist_utils.DistContext,
) -> nn.Module:
    source = make_source(images, batch_size, seed, ctx)
    hparams = {
        "batch_size": batch_size,
        "n_jitters": n_jitters,
        "lr": lr,
        "proj_dim": proj_dim,
        "downsampler": downsampler,
        "kernel_size": kernel_size,
        "max_pad": max_pad,
        "max_zoom": max_zoom,
        "p_zoom": p_zoom,
        "p_flip": p_flip,
        "uncertainty": uncertainty,
        "seed": seed,
    }
    state_path = Path(checkpoint_dir) / JBU_STATE_FILE if checkpoint_dir is not None else None
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    if state_path is not None and resume and state_path.is_file():
        saved = load_train_state(state_path, "jbu", map_location=device)
        check_hparams(_with_hparam_defaults(saved[1]["hparams"]), hparams, state_path)
        check_precision(saved[1], precision, state_path)
        if saved[1].get("world_size") != ctx.world_size:
            warnings.warn(
                f"resuming a run saved with world size {saved[1].get('world_size')} on {ctx.world_size} "
                "processes: training continues, but the data order differs from an uninterrupted run",
                stacklevel=3,
            )

    # the feature width sizes the downsampler and the uncertainty head: read it off the first batch
    first = validate_images(source.batch(0), "images").to(device)
    feat_dim = int(_features(backbone, first[:1], "first batch").shape[1])
    if saved is not None and saved[1]["feat_dim"] != feat_dim:
        raise CheckpointError(
            f"cannot resume from {state_path}: it was trained on {saved[1]['feat_dim']}-channel features, "
            f"the backbone now gives {feat_dim}"
        )

    torch.manual_seed(derive_seed(seed, "init"))  # every rank builds identical modules
    if upsampler is None:
        if saved is None:
            upsampler = JBUStack()
        else:  # a config saved before later options gets the values it was saved with
            upsampler = JBUStack(**JBUStack.kwargs_from_config(saved[1]["upsampler"]["kwargs"]))
    elif (
        saved is not None
        and hasattr(upsampler, "config")
        and _saved_kwargs(upsampler, saved[1]["upsampler"]["kwargs"])
        != json.loads(json.dumps(upsampler.config()))  # tuples -> lists
    ):
        raise CheckpointError(
            f"cannot resume from {state_path}: it holds a {saved[1]['upsampler']['class']} with "
            f"{saved[1]['upsampler']['kwargs']}, the given upsampler has {upsampler.config()}"
        )
    down = create_downsampler(downsampler, feat_dim, kernel_size)
    head = _uncertainty_head(uncertainty, feat_dim)
    objective = _JBUObjective(upsampler, down, head).to(device)
    if not any(p.requires_grad for p in upsampler.parameters()):
        raise ValueError("expected an upsampler with trainable parameters, got none requiring grad")
    optimizer = torch.optim.NAdam([p for p in objective.parameters() if p.requires_grad], lr=lr)
    scaler = make_grad_scaler(precision, device)  # enabled for float16 only
    modules: dict[str, nn.Module] = {"upsampler": upsampler, "downsampler": down}
    if head is not None:
        modules["head"] = head

    start = 0
    if saved is not None:
        restore_modules(saved[0], modules, state_path)  # type: ignore[arg-type]
        restore_optimizer(optimizer, saved[0], saved[1], state_path)  # type: ignore[arg-type]
        restore_grad_scaler(scaler, saved[1], state_path)  # type: ignore[arg-type]
        start = int(saved[1]["step"])
    model = dist_utils.wrap_ddp(objective, ctx, device)

    def save(step: int) -> None:
        if state_path is None:
            return
        if ctx.is_main:
            save_train_state(
                state_path,
                kind="jbu",
                step=step,
                modules=modules,
                optimizer=optimizer,
                config={
                    "hparams": hparams,
                    "feat_dim": feat_dim,
                    "world_size": ctx.world_size,
                    "upsampler": {"class": type(upsampler).__name__, "kwargs": _config_of(upsampler)},
                    "precision": precision,
                    "grad_scaler": scaler.state_dict(),
                },
            )
        dist_utils.barrier(ctx)

    bar = tqdm(
        total=steps, initial=min(start, steps), disable=not progress or not ctx.is_main, desc="train_jbu"
    )
    model.train()
    step = start
    try:
        while step < steps:
            x = first if step == 0 else validate_images(source.batch(step), "images").to(device)
            torch.manual_seed(derive_seed(seed, "dropout", ctx.rank, step))
            gen = torch.Generator().manual_seed(derive_seed(seed, "jitter", ctx.rank, step))
            with mixed_precision(precision, device):
                lr_feats = to_float32(_features(backbone, x, f"step {step}"))
            if lr_feats.shape[1] != feat_dim:
                raise ValueError(
                    f"expected {feat_dim}-channel backbone features, got {tuple(lr_feats.shape)}"
                )
            jitters = [
                [
                    sample_jitter(gen, max_pad=max_pad, max_zoom=max_zoom, p_zoom=p_zoom, p_flip=p_flip)
                    for _ in range(x.shape[0])
                ]
                for _ in range(n_jitters)
            ]
            with mixed_precision(precision, device):
                targets = [
                    to_float32(_features(backbone, apply_jitter(x, p), f"jittered view, step {step}"))
                    for p in jitters
                ]
            proj = None
            if proj_dim is not None:
                proj = random_projection(
                    feat_dim, proj_dim, generator=gen, device=device, dtype=lr_feats.dtype
                )
            with mixed_precision(precision, device):
                loss = model(x, lr_feats, jitters, targets, proj)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # scale/step/update are plain backward/step unless float16
            scaler.step(optimizer)
            scaler.update()
            step += 1
            logs = _step_logs(loss=loss.detach(), rec_loss=loss.detach(), tv_loss=0.0)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}")
            stop = bool(callback(step, logs)) if callback is not None else False
            if callback is not None:
                stop = dist_utils.any_true(stop, ctx, device)
            if step % checkpoint_every == 0 or step == steps or stop:
                save(step)
            if stop:
                break
    finally:
        bar.close()
    if state_path is not None and ctx.is_main and hasattr(upsampler, "save"):
        upsampler.save(
            state_path.parent / JBU_MODEL_FILE,
            extra={"trained_steps": step, **hparams, "precision": precision},
        )
    dist_utils.barrier(ctx)
    return upsampler.eval()


def _config_of(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    return config() if callable(config) else {}


# ----------------------------------------------------------------------------------------------------------
# implicit: the fitter lives in featup.core.implicit_fit; ``featup.core.training.fit_implicit`` stays importable


def __getattr__(name: str) -> Any:
    # lazy re-export: implicit_fit imports this module's shared helpers, so an eager import would be circular
    if name == "fit_implicit":
        from featup.core.implicit_fit import fit_implicit

        return fit_implicit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
