"""The JBU trainer: :func:`train_jbu` learns a :class:`~featup.core.jbu.JBUStack` over an image corpus.

Each step is the multi-view objective of :mod:`featup.core.multiview` (paper eq. 1) with
``F_hr = JBU(f(x), x)``, the predictions and targets projected to ``proj_dim`` random dimensions
(Johnson-Lindenstrauss); it runs data-parallel under ``torchrun``. The run's settings are one
:class:`~featup.core.training_config.JBUTrainConfig`. Measured rationale: docs/decisions.md#train-jbu.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featup.core import _distributed as dist_utils
from featup.core import multiview as mv
from featup.core._train_data import BatchSource, derive_seed, make_source, validate_images
from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError
from featup.core.downsamplers import AttentionDownsampler, window_pool
from featup.core.jbu import JBUStack
from featup.core.jitter import JitterParams, apply_jitter
from featup.core.losses import project, random_projection
from featup.core.precision import mixed_precision
from featup.core.training_config import JBUTrainConfig

__all__ = ["JBU_MODEL_FILE", "JBU_STATE_FILE", "JBUTrainConfig", "channel_linear", "train_jbu"]

JBU_STATE_FILE = "train_state.safetensors"
JBU_MODEL_FILE = "jbu_stack.safetensors"

#: what states saved before a setting existed were trained with (the Table 7 values, the uncertainty head)
_LEGACY_HPARAMS: dict[str, Any] = {
    "p_zoom": 0.5,
    "p_flip": 0.5,
    "uncertainty": True,
    "blur": False,
    "gate_lr_scale": 1.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "schedule_steps": None,
}


# ----------------------------------------------------------------------------------------------------------
# the objective as one module


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
            total = total + mv.view_loss(down, target, log_scale, proj)
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
        # every view has the same size, so the mean over all is the mean of the per-jitter means
        return mv.view_loss(pred, target, log_scale, proj, pred_projected=True)


# ----------------------------------------------------------------------------------------------------------
# the front


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
    callback: mv.Callback | None = None,
    **overrides: Any,
) -> Upsampler:
    """Train a JBU upsampler for a frozen backbone with FeatUp's multi-view loss (eq. 1, Table 7).

    Each step takes a batch ``x``, computes ``F_hr = up(f(x), x)`` and, for ``n_jitters`` jitters per image,
    minimises eq. 1 between ``f(t(x))`` and ``down(t(F_hr))`` after a fresh random projection to
    ``proj_dim`` dimensions (the uncertainty head reads the unprojected ``f(t(x))``). NAdam, no TV. With
    ``project_first`` and a :func:`channel_linear` upsampler the projection happens before upsampling (the
    same loss up to float rounding, ``proj_dim + 1`` channels upsampled instead of ``C``). Under ``torchrun``
    the trainable modules run in ``DistributedDataParallel``, each rank reads its own shard, rank 0 writes.
    Measured rationale of the defaults: docs/decisions.md#train-jbu.

    Args:
        backbone: frozen feature extractor ``(B,3,H,W) -> (B,C,h,w)``, called under ``torch.no_grad`` (an
            ``nn.Module`` is put in eval mode for the run and restored afterwards).
        images: RGB in [0, 1]: a tensor ``(N,3,H,W)`` (seeded per-epoch shuffle), a map-style ``Dataset``
            of ``(3,H,W)`` tensors (or ``(image, label)`` pairs), or a re-iterable of ``(B,3,H,W)`` batches
            such as a list or ``DataLoader`` (cycled; its batches set the batch size).
        steps: total optimiser steps (a resumed run continues up to this count); None: the preset's.
        preset: "default" or "paper" (:data:`~featup.core.training_config.JBU_PRESETS`).
        config: a whole :class:`~featup.core.training_config.JBUTrainConfig` instead of a preset (keyword
            overrides still apply).
        upsampler: the module to train in place and return; default a fresh ``JBUStack()`` (or the one
            stored in the checkpoint being resumed).
        checkpoint_dir: folder for ``train_state.safetensors`` (the resumable state, written every
            ``checkpoint_every`` steps) and, at the end, ``jbu_stack.safetensors`` (``JBUStack.load``-able);
            None disables both.
        progress: show a tqdm bar (rank 0 only).
        device: training device; default the backbone's parameter device (or torchrun's local CUDA device,
            or CPU). The backbone must already live there.
        callback: ``callback(step, logs)`` after each step; returning True stops training early.
        **overrides: fields of ``JBUTrainConfig`` (``lr=``, ``batch_size=``, ``n_jitters=``, ...).

    Returns:
        The trained upsampler in eval mode, on ``device``.

    Raises:
        TypeError, ValueError: bad settings or inputs, naming them. CheckpointError: the state in
        ``checkpoint_dir`` belongs to other settings, features or another upsampler. FloatingPointError: a
        non-finite loss (raised before that step updates or writes anything).

    Shape:
        - images: (N, 3, H, W) or batches (B, 3, H, W), RGB in [0, 1]
        - backbone output: (B, C, h, w)
    """
    cfg = _make_config(preset, config, steps, overrides)
    mv.check_callables(backbone, callback)
    if upsampler is not None and not isinstance(upsampler, nn.Module):
        raise TypeError(
            f"expected upsampler as an nn.Module (e.g. JBUStack) or None, got {type(upsampler).__name__}"
        )
    device = mv.resolve_device(backbone, device)
    ctx = dist_utils.setup(device)
    try:
        with mv.frozen(backbone), mv.training_context(device):
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


def _make_config(
    preset: str, config: JBUTrainConfig | None, steps: int | None, overrides: dict[str, Any]
) -> JBUTrainConfig:
    """The run's settings: ``config`` (else the named preset) with ``steps`` and ``overrides`` applied."""
    if steps is not None:
        overrides = {**overrides, "steps": steps}
    if config is None:
        return JBUTrainConfig.preset(preset, **overrides)
    if not isinstance(config, JBUTrainConfig):
        raise TypeError(f"expected config as a JBUTrainConfig or None, got {type(config).__name__}")
    return JBUTrainConfig.preset("paper", **{**config.to_dict(), **overrides})


# ----------------------------------------------------------------------------------------------------------
# the trainer, one named step at a time


@dataclass
class _Run:
    """The pieces of one run that outlive a step."""

    upsampler: nn.Module
    modules: dict[str, nn.Module]  # what the checkpoint holds: upsampler, downsampler, head
    objective: _JBUObjective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def _train_jbu(
    backbone: Callable,
    images: object,
    cfg: JBUTrainConfig,
    *,
    upsampler: nn.Module | None,
    checkpoint_dir: str | os.PathLike | None,
    progress: bool,
    device: torch.device,
    callback: mv.Callback | None,
    ctx: dist_utils.DistContext,
) -> nn.Module:
    source = make_source(images, cfg.batch_size, cfg.seed, ctx)
    state_path = Path(checkpoint_dir) / JBU_STATE_FILE if checkpoint_dir is not None else None
    saved = _load_state(state_path, cfg, ctx, device)
    first = _batch(source, 0, device)
    feat_dim = _feature_width(backbone, first, saved, state_path)
    run = _build_run(cfg, upsampler, saved, state_path, feat_dim, device)
    start = mv.restore_run(saved, run.modules, run.optimizer, run.scaler, state_path) if saved else 0
    model = dist_utils.wrap_ddp(run.objective, ctx, device)

    def step_fn(step: int) -> dict[str, float]:
        x = first if step == 0 else _batch(source, step, device)
        loss = _step_loss(model, backbone, x, cfg, feat_dim, step, ctx.rank, device)
        mv.check_finite_loss(loss, step, ctx, device)
        mv.optimizer_step(run.optimizer, run.scaler, loss, cfg.lr_at(step))
        return mv.step_logs(loss=loss.detach(), rec_loss=loss.detach(), tv_loss=0.0)

    def save(step: int) -> None:
        if state_path is None:
            return
        if ctx.is_main:
            mv.save_run(
                state_path,
                "jbu",
                step,
                run.modules,
                run.optimizer,
                run.scaler,
                cfg.precision,
                {
                    "hparams": cfg.hparams(),
                    "config": cfg.to_dict(),
                    "feat_dim": feat_dim,
                    "world_size": ctx.world_size,
                    "upsampler": {"class": type(run.upsampler).__name__, "kwargs": _config_of(run.upsampler)},
                },
            )
        dist_utils.barrier(ctx)

    model.train()
    step = mv.run_steps(
        step_fn,
        start,
        cfg.steps,
        save=save,
        checkpoint_every=cfg.checkpoint_every,
        callback=callback,
        progress=progress and ctx.is_main,
        desc="train_jbu",
        agree=lambda stop: dist_utils.any_true(stop, ctx, device),
    )
    _save_model(run.upsampler, state_path, step, cfg, ctx)
    return run.upsampler.eval()


def _batch(source: BatchSource, step: int, device: torch.device) -> torch.Tensor:
    return validate_images(source.batch(step), "images").to(device)


def _load_state(
    state_path: Path | None, cfg: JBUTrainConfig, ctx: dist_utils.DistContext, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The state to resume from (checked against ``cfg``), or None for a fresh run."""
    if state_path is None or not cfg.resume or not state_path.is_file():
        return None
    saved = mv.load_run(state_path, "jbu", cfg.hparams(), cfg.precision, device, _LEGACY_HPARAMS)
    if saved[1].get("world_size") != ctx.world_size:
        warnings.warn(
            f"resuming a run saved with world size {saved[1].get('world_size')} on {ctx.world_size} "
            "processes: training continues, but the data order differs from an uninterrupted run",
            stacklevel=4,
        )
    return saved


def _feature_width(
    backbone: Callable, first: torch.Tensor, saved: tuple | None, state_path: Path | None
) -> int:
    """The backbone's feature width (it sizes the downsampler and the head), read off the first image."""
    feat_dim = int(mv.backbone_features(backbone, first[:1], "first batch").shape[1])
    if saved is not None and saved[1]["feat_dim"] != feat_dim:
        raise CheckpointError(
            f"cannot resume from {state_path}: it was trained on {saved[1]['feat_dim']}-channel features, "
            f"the backbone now gives {feat_dim}"
        )
    return feat_dim


def _build_run(
    cfg: JBUTrainConfig,
    upsampler: nn.Module | None,
    saved: tuple | None,
    state_path: Path | None,
    feat_dim: int,
    device: torch.device,
) -> _Run:
    """Upsampler, downsampler, head and optimiser, initialised identically on every rank."""
    mv.seed_rngs(derive_seed(cfg.seed, "init"), device)
    upsampler = _upsampler_for(upsampler, saved, state_path)
    down, head = mv.loss_modules(
        cfg.downsampler, feat_dim, cfg.kernel_size, blur=cfg.blur, uncertainty=cfg.uncertainty
    )
    objective = _JBUObjective(upsampler, down, head, project_first=cfg.project_first).to(device)
    if not any(p.requires_grad for p in upsampler.parameters()):
        raise ValueError("expected an upsampler with trainable parameters, got none requiring grad")
    optimizer = torch.optim.NAdam(_param_groups(objective, cfg.gate_lr_scale), lr=cfg.lr)
    modules: dict[str, nn.Module] = {"upsampler": upsampler, "downsampler": down}
    if head is not None:
        modules["head"] = head
    scaler = mv.make_grad_scaler(cfg.precision, device)  # enabled for float16 only
    return _Run(upsampler, modules, objective, optimizer, scaler)


def _upsampler_for(upsampler: nn.Module | None, saved: tuple | None, state_path: Path | None) -> nn.Module:
    """The given upsampler (checked against a resumed state), else the resumed state's, else ``JBUStack()``."""
    if upsampler is None:
        if saved is None:
            return JBUStack()
        # a config saved before later options gets the values it was saved with
        return JBUStack(**JBUStack.kwargs_from_config(saved[1]["upsampler"]["kwargs"]))
    if (
        saved is not None
        and hasattr(upsampler, "config")
        and json.loads(json.dumps(_saved_kwargs(upsampler, saved[1]["upsampler"]["kwargs"])))
        != json.loads(json.dumps(_saved_kwargs(upsampler, upsampler.config())))  # tuples -> lists
    ):
        raise CheckpointError(
            f"cannot resume from {state_path}: it holds a {saved[1]['upsampler']['class']} with "
            f"{saved[1]['upsampler']['kwargs']}, the given upsampler has {upsampler.config()}"
        )
    return upsampler


def _param_groups(objective: nn.Module, gate_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the safe-start gates (``*.gate``) at ``gate_lr_scale`` x the rate.

    A zero-initialised gate holds back every parameter behind it, and under Adam a scalar moves about one
    learning rate per step (docs/decisions.md#gate-lr).
    """
    gates, rest = [], []
    for name, p in objective.named_parameters():
        if p.requires_grad:
            (gates if name.endswith(".gate") else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_scale": float(gate_lr_scale)})
    return groups


def _step_loss(
    model: nn.Module,
    backbone: Callable,
    x: torch.Tensor,
    cfg: JBUTrainConfig,
    feat_dim: int,
    step: int,
    rank: int,
    device: torch.device,
) -> torch.Tensor:
    """One step's loss: seed, draw the jitters, the backbone's features, the projection, the objective."""
    mv.seed_rngs(derive_seed(cfg.seed, "dropout", rank, step), device)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "jitter", rank, step))
    jitters = _draw_view_jitters(gen, cfg, int(x.shape[0]))
    lr_feats, targets = _batched_features(backbone, x, jitters, cfg.precision, step)
    if lr_feats.shape[1] != feat_dim:
        raise ValueError(f"expected {feat_dim}-channel backbone features, got {tuple(lr_feats.shape)}")
    proj = None
    if cfg.proj_dim is not None:
        proj = random_projection(feat_dim, cfg.proj_dim, generator=gen, device=device, dtype=lr_feats.dtype)
    drop_gen = torch.Generator(device=device).manual_seed(
        derive_seed(cfg.seed, "salience-dropout", rank, step)
    )
    with mixed_precision(cfg.precision, device):
        return model(x, lr_feats, jitters, targets, proj, drop_gen)


def _draw_view_jitters(gen: torch.Generator, cfg: JBUTrainConfig, batch: int) -> list[list[JitterParams]]:
    """``n_jitters`` lists of one jitter per image, drawn jitter-major from ``gen``."""
    flat = mv.draw_jitters(
        gen,
        cfg.n_jitters * batch,
        max_pad=cfg.max_pad,
        max_zoom=cfg.max_zoom,
        p_zoom=cfg.p_zoom,
        p_flip=cfg.p_flip,
    )
    return [flat[i * batch : (i + 1) * batch] for i in range(cfg.n_jitters)]


def _batched_features(
    backbone: Callable,
    x: torch.Tensor,
    jitters: list[list[JitterParams]],
    precision: str,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of the batch, then of all its jittered views in one more backbone call.

    Shape:
        - x: (B, 3, H, W); jitters: n lists of B jitters
        - output: (B, C, h, w) and (n * B, C, h, w), jitter-major
    """
    flat = [p for params in jitters for p in params]
    views = apply_jitter(x.repeat(len(jitters), 1, 1, 1), flat)
    lr_feats = mv.view_features(backbone, x, precision, f"step {step}")
    targets = mv.view_features(backbone, views, precision, f"jittered views, step {step}")
    return lr_feats, targets


def _save_model(
    upsampler: nn.Module, state_path: Path | None, step: int, cfg: JBUTrainConfig, ctx: dist_utils.DistContext
) -> None:
    """Rank 0 writes the trained upsampler (``JBUStack.load``-able) beside the training state."""
    if state_path is not None and ctx.is_main and hasattr(upsampler, "save"):
        upsampler.save(
            state_path.parent / JBU_MODEL_FILE,
            extra={"trained_steps": step, **cfg.hparams(), "precision": cfg.precision},
        )
    dist_utils.barrier(ctx)


def _saved_kwargs(upsampler: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """An upsampler config as constructor kwargs, the values of options it predates filled in (see
    ``kwargs_from_config``); two configs of one module compare equal in this form."""
    complete = getattr(type(upsampler), "kwargs_from_config", None)
    return complete(kwargs) if complete is not None else kwargs


def _config_of(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    return config() if callable(config) else {}
