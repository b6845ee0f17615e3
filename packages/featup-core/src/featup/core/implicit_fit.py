"""Fitting FeatUp's implicit upsampler to one image (paper Section 3.3, eq. 7-8, Table 7).

:func:`fit_implicit` compresses the image's features to their top PCA components and fits a per-image
:class:`~featup.core.implicit.ImplicitUpsampler` with the multi-view loss of :mod:`featup.core.training`
(eq. 1) plus a total-variation prior on feature magnitudes (eq. 8).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

# sample_jitter, reconstruction_loss and make_grad_scaler are looked up on the training module at call time,
# so one patch of featup.core.training (as the tests do) reaches both trainers
from featup.core import training as _training
from featup.core._train_data import derive_seed, validate_images
from featup.core._train_state import (
    check_hparams,
    check_precision,
    load_train_state,
    restore_grad_scaler,
    restore_modules,
    restore_optimizer,
    save_train_state,
)
from featup.core.checkpoint import CheckpointError
from featup.core.downsamplers import create_downsampler
from featup.core.implicit import ImplicitUpsampler
from featup.core.jitter import apply_jitter
from featup.core.losses import tv_loss
from featup.core.pca import PCA
from featup.core.precision import check_training_precision, full_precision, mixed_precision, to_float32
from featup.core.training import (
    Callback,
    _check_bool,
    _check_common,
    _check_float,
    _check_int,
    _check_probability,
    _features,
    _frozen,
    _resolve_device,
    _step_logs,
    _training_context,
    _uncertainty_head,
    _with_hparam_defaults,
)

__all__ = ["fit_implicit"]


def fit_implicit(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    steps: int = 2000,
    *,
    n_jitters: int = 10,
    lr: float = 1e-3,
    pca_dim: int = 128,
    kernel_size: int = 29,
    max_pad: int = 30,
    max_zoom: float = 1.8,
    p_zoom: float = 0.5,
    p_flip: float = 0.5,
    uncertainty: bool = True,
    tv_weight: float = 0.05,
    downsampler: str = "attention",
    upsampler_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: str = "float32",
    callback: Callback | None = None,
) -> ImplicitUpsampler:
    """Fit FeatUp's implicit upsampler to one image (Table 7 defaults).

    The image's features ``f(x)`` are compressed to their top ``pca_dim`` principal components; each step
    draws ``n_jitters`` jitters, renders the compressed high-resolution features ``F_hr`` of the implicit
    network (eq. 7), and minimises eq. 1 between ``PCA(f(t(x)))`` and ``down(t(F_hr))`` plus ``tv_weight``
    times the total variation of ``|F_hr|`` (eq. 8). NAdam.

    Args:
        backbone: frozen feature extractor ``(B,3,H,W) -> (B,C,h,w)``, called under ``torch.no_grad`` with
            the ``n_jitters`` views batched (an ``nn.Module`` is put in eval mode for the run).
        image: the image to fit, RGB in [0, 1].
        steps: total optimiser steps (a resumed fit continues up to this count).
        n_jitters: jittered views per step.
        lr: NAdam learning rate.
        pca_dim: PCA components kept (clipped to what the features support).
        kernel_size: downsampler kernel size.
        max_pad: jitter padding in pixels at 224 px.
        max_zoom: largest jitter zoom.
        p_zoom: probability that a jitter zooms (else zoom 1).
        p_flip: probability that a jitter flips horizontally (0 for features that are not flip-equivariant).
        uncertainty: learn eq. 1's per-pixel scale (the paper); False: plain mean squared error.
        tv_weight: weight of the total-variation prior.
        downsampler: "attention" or "simple".
        upsampler_kwargs: extra ``ImplicitUpsampler`` arguments (``hidden_dim``, ``n_freqs``, ...).
        seed: seed of every random draw.
        checkpoint_path: file for the resumable training state (network, downsampler, head, optimizer, step),
            written every ``checkpoint_every`` steps and at the end; None disables it.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint_path`` if present (a fit of the same image and settings).
        progress: show a tqdm bar.
        device: training device; default the backbone's parameter device, else CPU.
        precision: "float32", "bfloat16" or "float16", as in :func:`train_jbu` (the PCA and the targets'
            projection onto it are computed in float32).
        callback: ``callback(step, logs)`` after each step; returning True stops early.

    Returns:
        The fitted :class:`ImplicitUpsampler` in eval mode; ``render(size)`` gives ``(1,C,H',W')`` features
        in the backbone's space at any size.

    Shape:
        - image: (1, 3, H, W)
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
    _check_int("pca_dim", pca_dim, 1)
    _check_probability("p_zoom", p_zoom)
    _check_probability("p_flip", p_flip)
    _check_bool("uncertainty", uncertainty)
    _check_float("tv_weight", tv_weight, 0.0)
    check_training_precision(precision)
    image = validate_images(image, "image")
    if image.shape[0] != 1:
        raise ValueError(f"expected one image (1,3,H,W) to fit, got shape {tuple(image.shape)}")
    if upsampler_kwargs is not None and not isinstance(upsampler_kwargs, dict):
        raise TypeError(f"expected upsampler_kwargs as a dict or None, got {type(upsampler_kwargs).__name__}")
    device = _resolve_device(backbone, device)
    with _frozen(backbone), _training_context(device):
        return _fit_implicit(
            backbone,
            image.to(device).clone(),  # a normal tensor even if the caller made it under inference_mode
            steps,
            n_jitters=n_jitters,
            lr=lr,
            pca_dim=pca_dim,
            kernel_size=kernel_size,
            max_pad=max_pad,
            max_zoom=max_zoom,
            p_zoom=float(p_zoom),
            p_flip=float(p_flip),
            uncertainty=uncertainty,
            tv_weight=tv_weight,
            downsampler=downsampler,
            upsampler_kwargs=dict(upsampler_kwargs or {}),
            seed=seed,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            device=device,
            precision=precision,
            callback=callback,
        )


def _fit_implicit(
    backbone: Callable,
    image: torch.Tensor,
    steps: int,
    *,
    n_jitters: int,
    lr: float,
    pca_dim: int,
    kernel_size: int,
    max_pad: int,
    max_zoom: float,
    p_zoom: float,
    p_flip: float,
    uncertainty: bool,
    tv_weight: float,
    downsampler: str,
    upsampler_kwargs: dict[str, Any],
    seed: int,
    checkpoint_path: str | os.PathLike | None,
    checkpoint_every: int,
    resume: bool,
    progress: bool,
    device: torch.device,
    precision: str,
    callback: Callback | None,
) -> ImplicitUpsampler:
    hparams = {
        "n_jitters": n_jitters,
        "lr": lr,
        "pca_dim": pca_dim,
        "kernel_size": kernel_size,
        "max_pad": max_pad,
        "max_zoom": max_zoom,
        "p_zoom": p_zoom,
        "p_flip": p_flip,
        "uncertainty": uncertainty,
        "tv_weight": tv_weight,
        "downsampler": downsampler,
        "seed": seed,
    }
    saved = None
    if checkpoint_path is not None and resume and _st_path(checkpoint_path).is_file():
        saved = load_train_state(checkpoint_path, "implicit", map_location=device)
        check_hparams(_with_hparam_defaults(saved[1]["hparams"]), hparams, checkpoint_path)
        check_precision(saved[1], precision, checkpoint_path)

    with mixed_precision(precision, device):
        lr_feats = to_float32(_features(backbone, image, "image"))
    feat_dim = int(lr_feats.shape[1])
    out_size = tuple(lr_feats.shape[-2:])

    torch.manual_seed(derive_seed(seed, "init"))
    pca = PCA(feat_dim, pca_dim).to(device).fit(lr_feats)
    kwargs = {
        "feat_dim": feat_dim,
        "image_size": list(image.shape[-2:]),
        "pca_dim": pca_dim,
        **upsampler_kwargs,
    }
    if saved is not None:
        stored = saved[1]["upsampler"]["kwargs"]
        if stored["feat_dim"] != feat_dim or list(stored["image_size"]) != kwargs["image_size"]:
            raise CheckpointError(
                f"cannot resume from {checkpoint_path}: fitted to {stored['feat_dim']}-channel features of a "
                f"{tuple(stored['image_size'])} image, now {feat_dim} channels of {tuple(image.shape[-2:])}"
            )
        kwargs = stored
    imp = ImplicitUpsampler(**kwargs).to(device)
    imp.set_image(image)
    imp.set_pca(pca)
    # the network predicts imp.pca_dim channels; components the data could not support are zero-padded
    n_comp = int(imp.pca_dim)
    pca = imp.pca
    down = create_downsampler(downsampler, n_comp, kernel_size).to(device)
    head = _uncertainty_head(uncertainty, n_comp)
    modules: dict[str, nn.Module] = {"upsampler": imp, "downsampler": down}
    if head is not None:
        modules["head"] = head = head.to(device)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.NAdam(params, lr=lr)
    scaler = _training.make_grad_scaler(precision, device)  # enabled for float16 only

    start = 0
    if saved is not None:
        restore_modules(saved[0], modules, checkpoint_path)  # type: ignore[arg-type]
        if not torch.equal(imp.image.to(image.dtype), image):  # the stored guidance image
            raise CheckpointError(f"cannot resume from {checkpoint_path}: it was fitted to a different image")
        restore_optimizer(optimizer, saved[0], saved[1], checkpoint_path)  # type: ignore[arg-type]
        restore_grad_scaler(scaler, saved[1], checkpoint_path)  # type: ignore[arg-type]
        start = int(saved[1]["step"])

    def save(step: int) -> None:
        if checkpoint_path is None:
            return
        save_train_state(
            checkpoint_path,
            kind="implicit",
            step=step,
            modules=modules,
            optimizer=optimizer,
            config={
                "hparams": hparams,
                "feat_dim": feat_dim,
                "upsampler": {"class": type(imp).__name__, "kwargs": imp.config()},
                "precision": precision,
                "grad_scaler": scaler.state_dict(),
            },
        )

    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc="fit_implicit")
    for m in modules.values():
        m.train()
    step = start
    try:
        while step < steps:
            torch.manual_seed(derive_seed(seed, "dropout", 0, step))
            gen = torch.Generator().manual_seed(derive_seed(seed, "jitter", 0, step))
            jitters = [
                _training.sample_jitter(gen, max_pad=max_pad, max_zoom=max_zoom, p_zoom=p_zoom, p_flip=p_flip)
                for _ in range(n_jitters)
            ]
            views = apply_jitter(image.expand(n_jitters, -1, -1, -1), jitters)
            with torch.no_grad():
                with mixed_precision(precision, device):
                    feats = _features(backbone, views, f"jittered views, step {step}")
                targets = pca.transform(to_float32(feats))
            with mixed_precision(precision, device):
                hr = imp.forward_compressed(image)
                down_feats = down(apply_jitter(hr.expand(n_jitters, -1, -1, -1), jitters), out_size)
                log_scale = head(targets) if head is not None else None
            # under mixed precision the loss is still computed in float32
            with full_precision(device):
                hr, down_feats = to_float32(hr), to_float32(down_feats)
                log_scale = to_float32(log_scale) if log_scale is not None else None
                rec = _training.reconstruction_loss(down_feats, targets, log_scale)
                tv = tv_loss(hr) if tv_weight > 0 else hr.new_zeros(())
                loss = rec + tv_weight * tv
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # scale/step/update are plain backward/step unless float16
            scaler.step(optimizer)
            scaler.update()
            step += 1
            logs = _step_logs(loss=loss.detach(), rec_loss=rec.detach(), tv_loss=tv.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}")
            stop = bool(callback(step, logs)) if callback is not None else False
            if step % checkpoint_every == 0 or step == steps or stop:
                save(step)
            if stop:
                break
    finally:
        bar.close()
    for m in modules.values():
        m.eval()
    return imp


def _st_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_suffix(path.suffix + ".safetensors")
