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
import torch.nn.functional as F
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
from featup.core.downsamplers import AttentionDownsampler, create_downsampler, window_pool
from featup.core.jbu import JBUStack
from featup.core.jitter import JitterParams, apply_jitter, sample_jitter
from featup.core.losses import UncertaintyHead, project, random_projection, reconstruction_loss
from featup.core.precision import (
    full_precision,
    make_grad_scaler,
    mixed_precision,
    to_float32,
)
from featup.core.training_config import JBUTrainConfig

__all__ = ["JBUTrainConfig", "channel_linear", "fit_implicit", "train_jbu"]  # noqa: F822 (fit_implicit: see __getattr__)

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


def _param_groups(objective: nn.Module, gate_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the safe-start gates (``*.gate``) at ``gate_lr_scale`` x the rate.

    A zero-initialised gate holds back every parameter behind it, and under Adam a scalar moves about one
    learning rate per step, so at the usual rates the stack would stay near its safe start for hundreds of
    steps (docs/decisions.md#gate-lr).
    """
    gates, rest = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (gates if name.endswith(".gate") else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_scale": float(gate_lr_scale)})
    return groups


def _with_hparam_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """States saved before ``p_zoom`` / ``p_flip`` / ``uncertainty`` existed were trained with the Table 7
    values (0.5, 0.5) and with the uncertainty head."""
    return {
        "p_zoom": 0.5,
        "p_flip": 0.5,
        "uncertainty": True,
        "blur": False,
        "gate_lr_scale": 1.0,
        "schedule": "constant",
        "warmup_steps": 0,
        "schedule_steps": None,
        **saved,
    }


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
    with (
        torch.random.fork_rng(devices=_forked_devices(device)),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
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
    return _check_finite_features(feats.detach(), what)


def _seed_rngs(seed: int, device: torch.device) -> None:
    """Seed only the generators a run on ``device`` draws from: the CPU's and, on CUDA, that device's.

    ``torch.manual_seed`` would also seed every other CUDA device (or queue that seeding until CUDA starts),
    which ``fork_rng`` then may not restore: the caller's generators would change.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def _forked_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state ``fork_rng`` must save: every initialised one, and the training one."""
    devices: set[int] = set()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.update(range(torch.cuda.device_count()))
    if device.type == "cuda":
        devices.add(device.index if device.index is not None else torch.cuda.current_device())
    return sorted(devices)


def _check_finite_features(feats: torch.Tensor, what: str) -> torch.Tensor:
    """Raise when backbone features hold NaN or infinity (they would poison every parameter)."""
    if not bool(torch.isfinite(feats).all()):
        n_bad = int((~torch.isfinite(feats)).sum())
        raise ValueError(
            f"expected finite backbone features, got {n_bad} NaN/inf values of {feats.numel()} ({what}); "
            "nothing was trained or written on them"
        )
    return feats


def _check_finite_loss(
    loss: torch.Tensor,
    step: int,
    ctx: dist_utils.DistContext | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise before the backward pass, the optimizer step and any checkpoint when the loss is NaN/inf.

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


def _batched_features(
    backbone: Callable,
    x: torch.Tensor,
    jitters: list[list[JitterParams]],
    precision: str,
    device: torch.device,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of the batch, then of all its jittered views in one more backbone call.

    Shape:
        - x: (B, 3, H, W); jitters: n lists of B jitters
        - output: (B, C, h, w) and (n * B, C, h, w), jitter-major
    """
    flat = [p for params in jitters for p in params]
    views = apply_jitter(x.repeat(len(jitters), 1, 1, 1), flat)
    with mixed_precision(precision, device):
        lr_feats = to_float32(_features(backbone, x, f"step {step}"))
        targets = to_float32(_features(backbone, views, f"jittered views, step {step}"))
    return lr_feats, targets


def _step_logs(**values: torch.Tensor | float) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------
# JBU


def channel_linear(upsampler: nn.Module) -> bool:
    """True when ``upsampler`` applies one image-dependent linear operator to every feature channel alike.

    Then ``up(f @ P) = up(f) @ P`` for any channel mixing ``P`` (the random projection, the attention
    downsampler's salience conv), so training may upsample a few mixed channels instead of all of them.
    The default encoder-agnostic :class:`JBUStack` (``feat_dim=None``) is; a stack with a per-feature 1x1
    conv, the original layout, and any other module are treated as not.
    """
    declared = getattr(upsampler, "channel_linear", None)
    if isinstance(declared, bool):
        return declared
    return isinstance(upsampler, JBUStack) and upsampler.feat_dim is None and not upsampler.original


class _JBUObjective(nn.Module):
    """Every trainable piece of JBU training behind one forward, so DistributedDataParallel sees one module.

    ``forward`` returns eq. 1 averaged over the jitters: ``F_hr = up(f(x), x)`` once, then for each jitter
    the projected ``down(t(F_hr))`` against the projected ``f(t(x))`` with log-scales from ``head(f(t(x)))``.

    With ``project_first`` and a :func:`channel_linear` upsampler the same quantity is computed on
    ``D + 1`` channels instead of ``C``: the low-res features are projected to ``D`` dimensions and, for the
    attention downsampler, its salience conv is applied to them (one more channel) before upsampling; the
    jitters, the downsampler's pre-blur and its window pooling act on every channel alike, so they commute
    with both. Exact up to float rounding, except that the salience conv's dropout masks the low-res
    features instead of the high-res ones (the masks are drawn from ``dropout_generator``).
    """

    def __init__(
        self,
        upsampler: nn.Module,
        downsampler: nn.Module,
        head: nn.Module | None,
        *,
        project_first: bool = False,
    ) -> None:
        super().__init__()
        self.upsampler = upsampler
        self.downsampler = downsampler
        self.head = head
        self.project_first = bool(project_first) and channel_linear(upsampler)

    def forward(
        self,
        image: torch.Tensor,
        lr_feats: torch.Tensor,
        jitters: list[list[JitterParams]],
        targets: torch.Tensor | list[torch.Tensor],
        proj: torch.Tensor | None,
        dropout_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):  # the views of all jitters, jitter-major (n * B, C, h, w)
            targets = list(targets.chunk(len(jitters)))
        # projecting first pays only when it shrinks the channels the upsampler carries
        narrower = proj is not None and proj.shape[1] + 1 < lr_feats.shape[1]
        if self.project_first and narrower:
            return self._projected_first(image, lr_feats, jitters, targets, proj, dropout_generator)
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

    def _projected_first(
        self,
        image: torch.Tensor,
        lr_feats: torch.Tensor,
        jitters: list[list[JitterParams]],
        targets: list[torch.Tensor],
        proj: torch.Tensor | None,
        dropout_generator: torch.Generator | None,
    ) -> torch.Tensor:
        down = self.downsampler
        attention = isinstance(down, AttentionDownsampler)
        low = project(lr_feats, proj) if proj is not None else lr_feats
        dim = low.shape[1]
        if attention:
            conv = down.salience_net[1]
            sal_in = lr_feats
            if down.training and down.dropout > 0:
                keep = 1.0 - down.dropout
                mask = torch.empty_like(lr_feats).bernoulli_(keep, generator=dropout_generator)
                sal_in = lr_feats * mask / keep
            salience = F.conv2d(sal_in, conv.weight.to(sal_in.dtype))  # bias added after upsampling
            low = torch.cat([low, salience.to(low.dtype)], dim=1)
        hr = self.upsampler(low, image)
        n = len(jitters)
        flat = [p for params in jitters for p in params]
        views = apply_jitter(hr.repeat(n, 1, 1, 1), flat)  # jitter-major, like the targets
        size = tuple(targets[0].shape[-2:])
        if attention:
            views = down.prepare(views)
            salience = views[:, dim:] + conv.bias.to(views.dtype).view(1, 1, 1, 1)
            pred = window_pool(views[:, :dim], down.salience_kernels(salience, size), size)
        else:
            pred = down(views, size)
        target = torch.cat(targets)
        log_scale = self.head(target) if self.head is not None else None
        with full_precision(hr.device):
            pred, target = to_float32(pred), to_float32(target)
            log_scale = to_float32(log_scale) if log_scale is not None else None
            if proj is not None:
                target = project(target, proj)
            # every view has the same size, so the mean over all is the mean of the per-jitter means
            return reconstruction_loss(pred, target, log_scale)


def _saved_kwargs(upsampler: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A saved upsampler config with the values of options it predates filled in (see ``kwargs_from_config``)."""
    complete = getattr(type(upsampler), "kwargs_from_config", None)
    return complete(kwargs) if complete is not None else kwargs


def train_jbu(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | Iterable[torch.Tensor],
    steps: int | None = None,
    *,
    preset: str = "default",
    config: JBUTrainConfig | None = None,
    upsampler: Upsampler | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    **overrides: Any,
) -> Upsampler:
    """Train a JBU upsampler for a frozen backbone with FeatUp's multi-view loss.

    Each step takes a batch of images ``x``, computes ``F_hr = up(f(x), x)`` and, for ``n_jitters`` jitters
    per image (pad up to ``max_pad`` px at 224 px, zoom up to ``max_zoom``, crop, flip; drawn independently
    per image), minimises eq. 1 between ``f(t(x))`` and ``down(t(F_hr))`` after a fresh random projection
    to ``proj_dim`` dimensions; the uncertainty head reads the full-dimensional ``f(t(x))``. NAdam, no TV.

    The run's settings are one :class:`~featup.core.training_config.JBUTrainConfig`: the named ``preset``
    ("default", or "paper" for Table 7, which needs 2000 steps on a GPU) with ``steps`` and any field given
    as a keyword (``lr=``, ``batch_size=``, ``n_jitters=``, ``proj_dim=``, ``downsampler=``, ``kernel_size=``,
    ``max_pad=``, ``max_zoom=``, ``p_zoom=``, ``p_flip=``, ``uncertainty=``, ``blur=``, ``project_first=``,
    ``schedule=``, ``warmup_steps=``, ``seed=``, ``checkpoint_every=``, ``resume=``, ``precision=``), or a
    whole ``config``. Its run-defining settings are stored in the checkpoint; resuming with others raises
    :class:`CheckpointError`.

    With ``project_first`` (default) and a channel-linear upsampler (the default ``JBUStack()``, see
    :func:`channel_linear`), the low-res features are projected before upsampling, so each step upsamples
    ``proj_dim + 1`` channels instead of all ``C``: the same loss up to float rounding, except that the
    attention downsampler's salience dropout then masks the low-res features.

    Under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) the process group is initialised if needed (NCCL on
    CUDA, gloo on CPU), the trainable modules are wrapped in ``DistributedDataParallel``, each rank reads a
    different shard of the corpus, and only rank 0 writes checkpoints while the others wait at a barrier.

    Args:
        backbone: frozen feature extractor, any callable ``(B,3,H,W) -> (B,C,h,w)``; called under
            ``torch.no_grad`` (an ``nn.Module`` is put in eval mode for the run and restored afterwards).
        images: RGB in [0, 1]: a tensor ``(N,3,H,W)`` (read in a seeded, per-epoch shuffled order), a
            map-style ``Dataset`` of ``(3,H,W)`` tensors (or ``(image, label)`` pairs), or any re-iterable of
            ``(B,3,H,W)`` batches such as a list or ``DataLoader`` (cycled; its batches set the batch size).
        steps: total optimiser steps (a resumed run continues up to this count); None: the preset's.
        preset: "default" or "paper" (see :data:`~featup.core.training_config.JBU_PRESETS`).
        config: a complete config instead of a preset (keywords still override its fields).
        upsampler: the module to train in place and return; default a fresh encoder-agnostic
            ``JBUStack()`` (or the one stored in the checkpoint being resumed).
        checkpoint_dir: folder for ``train_state.safetensors`` (full resumable state: all modules, optimizer,
            step) and, at the end, ``jbu_stack.safetensors`` (``JBUStack.load``-able); None disables both.
        progress: show a tqdm bar (rank 0 only).
        device: training device; default the backbone's parameter device (or torchrun's local CUDA device,
            or CPU). The backbone must already live there.
        callback: ``callback(step, logs)`` after each step; returning True stops training early.
        **overrides: fields of :class:`~featup.core.training_config.JBUTrainConfig`.

    Returns:
        The trained upsampler in eval mode, on ``device``.

    Raises:
        TypeError, ValueError: bad settings or inputs, naming them. FloatingPointError: a non-finite loss
        (raised before that step updates or writes anything).

    Shape:
        - images: (N, 3, H, W) or batches (B, 3, H, W), RGB in [0, 1]
        - backbone output: (B, C, h, w)
    """
    if steps is not None:
        overrides["steps"] = steps
    if config is not None:
        if not isinstance(config, JBUTrainConfig):
            raise TypeError(f"expected config as a JBUTrainConfig or None, got {type(config).__name__}")
        cfg = JBUTrainConfig.preset("paper", **{**config.to_dict(), **overrides})
    else:
        cfg = JBUTrainConfig.preset(preset, **overrides)
    _check_common(
        backbone,
        cfg.steps,
        cfg.n_jitters,
        cfg.lr,
        cfg.kernel_size,
        cfg.max_pad,
        cfg.max_zoom,
        cfg.downsampler,
        cfg.seed,
        cfg.checkpoint_every,
        callback,
    )
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
                cfg,
                upsampler=upsampler,
                checkpoint_dir=checkpoint_dir,
                progress=progress,
                device=device,
                callback=callback,
                ctx=ctx,
            )
    finally:
        dist_utils.teardown(ctx)


def _train_jbu(
    backbone: Callable,
    images: object,
    cfg: JBUTrainConfig,
    *,
    upsampler: nn.Module | None,
    checkpoint_dir: str | os.PathLike | None,
    progress: bool,
    device: torch.device,
    callback: Callback | None,
    ctx: dist_utils.DistContext,
) -> nn.Module:
    steps, batch_size, n_jitters, lr, proj_dim = (
        cfg.steps,
        cfg.batch_size,
        cfg.n_jitters,
        cfg.lr,
        cfg.proj_dim,
    )
    downsampler, kernel_size, max_pad, max_zoom = cfg.downsampler, cfg.kernel_size, cfg.max_pad, cfg.max_zoom
    p_zoom, p_flip, uncertainty, blur, seed = cfg.p_zoom, cfg.p_flip, cfg.uncertainty, cfg.blur, cfg.seed
    checkpoint_every, resume, precision = cfg.checkpoint_every, cfg.resume, cfg.precision
    source = make_source(images, batch_size, seed, ctx)
    hparams = cfg.hparams()
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

    _seed_rngs(derive_seed(seed, "init"), device)  # every rank builds identical modules
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
    down = create_downsampler(downsampler, feat_dim, kernel_size, blur=blur)
    head = _uncertainty_head(uncertainty, feat_dim)
    objective = _JBUObjective(upsampler, down, head, project_first=cfg.project_first).to(device)
    if not any(p.requires_grad for p in upsampler.parameters()):
        raise ValueError("expected an upsampler with trainable parameters, got none requiring grad")
    optimizer = torch.optim.NAdam(_param_groups(objective, cfg.gate_lr_scale), lr=lr)
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
                    "config": cfg.to_dict(),
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
            _seed_rngs(derive_seed(seed, "dropout", ctx.rank, step), device)
            gen = torch.Generator().manual_seed(derive_seed(seed, "jitter", ctx.rank, step))
            jitters = [
                [
                    sample_jitter(gen, max_pad=max_pad, max_zoom=max_zoom, p_zoom=p_zoom, p_flip=p_flip)
                    for _ in range(x.shape[0])
                ]
                for _ in range(n_jitters)
            ]
            lr_feats, targets = _batched_features(backbone, x, jitters, precision, device, step)
            if lr_feats.shape[1] != feat_dim:
                raise ValueError(
                    f"expected {feat_dim}-channel backbone features, got {tuple(lr_feats.shape)}"
                )
            proj = None
            if proj_dim is not None:
                proj = random_projection(
                    feat_dim, proj_dim, generator=gen, device=device, dtype=lr_feats.dtype
                )
            drop_gen = torch.Generator(device=device).manual_seed(
                derive_seed(seed, "salience-dropout", ctx.rank, step)
            )
            with mixed_precision(precision, device):
                loss = model(x, lr_feats, jitters, targets, proj, drop_gen)
            _check_finite_loss(loss, step, ctx, device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step) * group["lr_scale"]
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
