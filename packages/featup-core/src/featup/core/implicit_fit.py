"""Fitting FeatUp's implicit upsampler to one image (paper Section 3.3, eq. 7-8, Table 7).

:func:`fit_implicit` compresses the image's features to their top PCA components and fits a per-image
:class:`~featup.core.implicit.ImplicitUpsampler` with the multi-view loss of :mod:`featup.core.multiview`
(eq. 1) plus a total-variation prior on feature magnitudes (eq. 8). A run's settings are one frozen
:class:`ImplicitFitConfig`, built from a named preset (``"default"``, or ``"paper"`` for Table 7) and
keyword overrides. Measured rationale of the defaults: ``docs/decisions.md#implicit``.

What makes a step cheap (the backbone is frozen and the views are known in advance):

- a seeded bank of ``bank_size`` jittered views and their PCA-compressed backbone features is computed once
  (as the original code does with 3000 views); each step draws ``n_jitters`` of them;
- the jitter and the downsampler's window pooling are fused (:func:`fused_view_pool`): no jittered copy of
  the high-resolution features is ever built, and the salience is computed once and jittered as one channel;
  on the CPU all windows are the rows of one sparse (CSR) matrix over the pixel-major map, each a rectangle
  as tight as its view's band (elsewhere: grouped GEMMs over contiguous slabs);
- the field is evaluated on the whole pixel grid without a per-pixel encoding
  (``ImplicitUpsampler._grid_field``: separable coordinate terms, constant colour tables, LayerNorm folded
  into the first layer), and stays pixel-major (channels-last) from the MLP to the pooling.

Where a step's time goes and what each change bought: ``docs/decisions.md#implicit-grid``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featup.core import multiview as mv
from featup.core._checks import check_bool, check_float, check_int, check_probability
from featup.core._train_data import derive_seed, validate_images
from featup.core.checkpoint import CheckpointError
from featup.core.downsamplers import (
    AttentionDownsampler,
    _masked_softmax,
    window_indices,
    window_pool,
)
from featup.core.implicit import ImplicitUpsampler
from featup.core.jitter import JitterParams, apply_jitter
from featup.core.losses import tv_loss
from featup.core.pca import PCA
from featup.core.precision import check_training_precision, full_precision, mixed_precision, to_float32

__all__ = ["PRESETS", "ImplicitFitConfig", "fit_implicit", "fused_view_pool"]


# ----------------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class ImplicitFitConfig:
    """Every setting of one :func:`fit_implicit` run; validated on creation.

    Attributes:
        steps: total optimiser steps (a resumed fit continues up to this count).
        n_jitters: jittered views per step.
        lr: peak NAdam learning rate.
        pca_dim: principal components of the features the network predicts.
        kernel_size: downsampler window; None: the backbone's stride.
        max_pad, max_zoom, p_zoom, p_flip: the jitters (pad in px at 224 px). Default: no flips, zoom <= 1.2
            (flips and strong zooms assume a flip- and scale-equivariant backbone; measured in
            docs/decisions.md#consistency); the paper preset: flips, zoom <= 1.8.
        uncertainty: learn eq. 1's per-pixel scale; False: plain mean squared error.
        tv_weight: weight of the total variation of ``|F_hr|`` (eq. 8).
        downsampler: "simple" (learned blur) or "attention" (eq. 2).
        seed: seed of every random draw.
        bank_size: jittered views (and their features) computed once, ``n_jitters`` drawn from them per
            step; None: fresh views and a backbone call every step.
        fused: pool the jittered views with :func:`fused_view_pool`; False: jitter the map and pool it with
            the downsampler module (the plain path the fused one is tested against).
        residual: start from the bicubic upsampling of the compressed features; False: the paper's form.
        consistency: rendered features back-projected onto the low-res features (ImplicitUpsampler's
            ``consistency``); False: the field alone, as in the paper.
        dropout_mode: "channel" (the original code's ``Dropout2d``) or "element".
        schedule, warmup_steps, min_lr_ratio: "constant", or "cosine": linear warm-up over
            ``warmup_steps``, then a cosine decay to ``min_lr_ratio * lr`` at ``steps``.
        mag_weight: weight of the squared error of the pooled ``|F_hr|`` against ``|PCA(f(t(x)))|``.
        blur_pin: weight of ``mean (blur(F_hr) - F_hr)^2`` (the original code's two extra regularisers).
        pca_views: jittered views added to the map's pixels when fitting the PCA.
        checkpoint_every: steps between checkpoints.

    Raises:
        TypeError, ValueError: a setting of the wrong type or out of range, naming it.
    """

    steps: int = 300
    n_jitters: int = 10
    lr: float = 1e-3
    pca_dim: int = 128
    kernel_size: int | None = None
    max_pad: int = 30
    max_zoom: float = 1.2
    p_zoom: float = 0.5
    p_flip: float = 0.0
    uncertainty: bool = True
    tv_weight: float = 0.05
    downsampler: str = "simple"
    seed: int = 0
    bank_size: int | None = 64
    fused: bool = True
    residual: bool = True
    consistency: bool = True
    dropout_mode: str = "channel"
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    mag_weight: float = 0.0
    blur_pin: float = 0.0
    pca_views: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("n_jitters", self.n_jitters, 1)
        check_float("lr", self.lr, 0.0, strict=True)
        check_int("pca_dim", self.pca_dim, 1)
        if self.kernel_size is not None:
            check_int("kernel_size", self.kernel_size, 1)
        check_int("max_pad", self.max_pad, 0)
        check_float("max_zoom", self.max_zoom, 1.0)
        check_probability("p_zoom", self.p_zoom)
        check_probability("p_flip", self.p_flip)
        check_bool("uncertainty", self.uncertainty)
        check_float("tv_weight", self.tv_weight, 0.0)
        if self.downsampler not in ("simple", "attention"):
            raise ValueError(f"expected downsampler 'simple' or 'attention', got {self.downsampler!r}")
        check_int("seed", self.seed, 0)
        if self.bank_size is not None:
            check_int("bank_size", self.bank_size, 1)
        check_bool("fused", self.fused)
        check_bool("residual", self.residual)
        check_bool("consistency", self.consistency)
        if self.dropout_mode not in ("element", "channel"):
            raise ValueError(f"expected dropout_mode 'element' or 'channel', got {self.dropout_mode!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"expected schedule 'constant' or 'cosine', got {self.schedule!r}")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_probability("min_lr_ratio", self.min_lr_ratio)
        check_float("mag_weight", self.mag_weight, 0.0)
        check_float("blur_pin", self.blur_pin, 0.0)
        check_int("pca_views", self.pca_views, 0)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        for name in ("p_zoom", "p_flip", "lr", "max_zoom", "tv_weight", "min_lr_ratio", "mag_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "blur_pin", float(self.blur_pin))

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> ImplicitFitConfig:
        """The preset's settings with ``overrides`` applied (unknown names are a clear error)."""
        if preset not in PRESETS:
            raise ValueError(f"expected preset one of {sorted(PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown fit_implicit settings {unknown}; expected some of {sorted(known)}")
        return cls(**{**PRESETS[preset], **overrides})

    def hparams(self) -> dict[str, Any]:
        """The settings that define the run (stored in the checkpoint, compared on resume)."""
        out = asdict(self)
        for name in ("steps", "checkpoint_every"):  # a resumed run may go further or checkpoint elsewhen
            out.pop(name)
        return out


#: Named settings. "default": safe start, fast path, the settings measured best at 100 CPU steps
#: (docs/decisions.md#implicit). "paper": Table 7 with the paper's parameterisation, fresh views every step and
#: the plain pooling path, i.e. the code's former behaviour (2000 steps; made for a GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": dict(
        steps=2000,
        n_jitters=10,
        lr=1e-3,
        pca_dim=128,
        kernel_size=29,
        max_pad=30,
        max_zoom=1.8,
        p_flip=0.5,
        tv_weight=0.05,
        downsampler="attention",
        bank_size=None,
        fused=False,
        residual=False,
        consistency=False,
        dropout_mode="element",
        schedule="constant",
        warmup_steps=0,
        mag_weight=0.0,
        blur_pin=0.0,
        pca_views=0,
    ),
}

#: what checkpoints written before a setting existed were trained with
_LEGACY_HPARAMS = dict(
    p_zoom=0.5,
    p_flip=0.5,
    uncertainty=True,
    bank_size=None,
    fused=False,
    residual=False,
    consistency=False,
    dropout_mode="element",
    schedule="constant",
    warmup_steps=0,
    min_lr_ratio=0.1,
    mag_weight=0.0,
    blur_pin=0.0,
    pca_views=0,
)


def lr_factor(cfg: ImplicitFitConfig, step: int) -> float:
    """Learning-rate multiplier of the 0-based ``step`` under the config's schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------------------
# fused jitter + window pooling: down(t(F_hr)) for many views without materialising any jittered map


def _axis_taps(
    coeffs: list[tuple[float, float, bool]], size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of a jitter along one axis, as ``grid_sample(reflection, align_corners=False)`` reads.

    A jitter is an axis-aligned affine map (:meth:`JitterParams.affine`), so along each axis output pixel
    ``p`` reads two input pixels. ``coeffs`` holds per view ``(scale, shift, flip)`` of ``v = scale u +
    shift`` in normalised coordinates (``flip`` mirrors the output afterwards, as :func:`apply_jitter` does).

    Shape:
        - output: indices (B, size, 2) long, weights (B, size, 2)
    """
    pos = torch.arange(size, dtype=torch.float64)
    out_idx, out_w = [], []
    for scale, shift, flip in coeffs:
        p = pos.flip(0) if flip else pos
        u = (2 * p + 1) / size - 1
        x = ((scale * u + shift + 1) * size - 1) / 2  # unnormalise (align_corners=False)
        # reflect about -0.5 and size - 0.5, then clip (grid_sample's reflection padding)
        span = float(size)
        d = (x + 0.5).abs()
        extra = torch.fmod(d, span)
        flips = torch.floor(d / span)
        x = torch.where(flips % 2 == 0, extra - 0.5, span - extra - 0.5).clamp(0, size - 1)
        x0 = torch.floor(x)
        w1 = x - x0
        i0 = x0.long()
        i1 = (i0 + 1).clamp(max=size - 1)  # past the edge only when w1 == 0
        out_idx.append(torch.stack([i0, i1], 1))
        out_w.append(torch.stack([1 - w1, w1], 1))
    return torch.stack(out_idx).to(device), torch.stack(out_w).to(device)


def _jitter_taps(
    jitters: list[JitterParams], size: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column taps of each jitter: (iy, wy) (B, H, 2) and (ix, wx) (B, W, 2)."""
    cols, rows = [], []
    for p in jitters:
        (sx, _, tx), (_, sy, ty) = replace(p, flip=False).affine()
        cols.append((sx, tx, p.flip))
        rows.append((sy, ty, False))
    iy, wy = _axis_taps(rows, size[0], device)
    ix, wx = _axis_taps(cols, size[1], device)
    return iy, wy, ix, wx


def _jitter_map(x: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Apply the jitters to a small map with gathers (used for the 1-channel salience). (1,C,H,W) -> (B,C,H,W)."""
    iy, wy, ix, wx = taps
    b = iy.shape[0]
    _, c, h, w = x.shape
    rows = x[0][:, iy.reshape(-1)].view(c, b, h, 2, w)
    rows = (rows * wy.to(x.dtype).view(1, b, h, 2, 1)).sum(3)  # (C, B, H, W)
    gathered = torch.gather(
        rows.permute(1, 0, 2, 3).reshape(b, c * h, w), 2, ix.reshape(b, 1, -1).expand(-1, c * h, -1)
    ).view(b, c, h, w, 2)
    return (gathered * wx.to(x.dtype).view(b, 1, 1, w, 2)).sum(-1)


def _scratch(
    workspace: dict[str, torch.Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A tensor of ``shape`` whose memory is kept in ``workspace`` between calls (fresh without a workspace).

    Why: the fused pooling's 10-35 MB temporaries, allocated fresh each step, are handed back to the
    kernel by glibc and page-faulted in again on the next step; a fit reuses the same memory instead. A
    tensor saved for backward and overwritten by a later forward before that backward ran makes autograd
    raise (version counter), never a silent wrong answer.

    Shape: -> ``shape`` (a view of the workspace's buffer ``name``, grown when too small).
    """
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = workspace.get(name)
    if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        workspace[name] = buf
    return buf[:numel].view(shape)


class _TilePool(torch.autograd.Function):
    """out[n] = mats[n] . hr[rs + (0..Ls), cs + (0..Lt)] with ``mats[n] = left[n] @ ax[n]`` (Ls, Lt), for
    windows ``n`` grouped by (row slab, column tile).

    ``hr`` is pixel-major (H*W, C). The column tiles ``hr[:, cs : cs + Lt]`` are copied once into contiguous
    (H, Lt, C) blocks, so each group of windows is one GEMM ``(m, Ls*Lt) @ (Ls*Lt, C)`` over a contiguous
    slab; backward accumulates into the tiles' gradients and adds them back into one buffer. The pooling
    matrices are formed here (not by autograd) so that they, their gradient and the tiles can live in a
    reusable ``workspace`` (:func:`_scratch`); ``ax`` is a constant (no gradient).

    Shape: hr (H*W, C), left (N, Ls, k), ax (N, k, Lt) -> (N, C); ``plan`` lists (first, last + 1, tile, rs)
    per group.
    """

    @staticmethod
    def forward(ctx, hr, left, ax, plan, size, tile_starts, slab, workspace):  # type: ignore[override]
        in_h, in_w = size
        rows_l, cols_l = slab
        n, dtype, device = left.shape[0], hr.dtype, hr.device
        mats = _scratch(workspace, "mats", (n, rows_l, cols_l), dtype, device)
        torch.bmm(left, ax, out=mats)
        mats = mats.view(n, rows_l * cols_l)
        grid = hr.view(in_h, in_w, -1)
        c = grid.shape[-1]
        whole = len(tile_starts) == 1 and cols_l == in_w  # one tile: the map itself, no copy
        if whole:
            tiles = [grid]
        else:
            tiles = [
                _scratch(workspace, f"tile{t}", (in_h, cols_l, c), dtype, device).copy_(
                    grid[:, s : s + cols_l]
                )
                for t, s in enumerate(tile_starts)
            ]
        out = hr.new_empty(n, c)
        for first, last, t, rs in plan:
            block = tiles[t][rs : rs + rows_l].view(rows_l * cols_l, -1)
            torch.mm(mats[first:last], block, out=out[first:last])
        ctx.plan, ctx.size, ctx.tile_starts, ctx.slab = plan, size, tile_starts, slab
        ctx.workspace = workspace
        ctx.save_for_backward(mats, ax, *tiles)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        mats, ax, *tiles = ctx.saved_tensors
        in_h, in_w = ctx.size
        rows_l, cols_l = ctx.slab
        c = tiles[0].shape[-1]
        ws = ctx.workspace
        dtype, device = mats.dtype, mats.device
        need_hr, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_tiles = None
        whole = len(ctx.tile_starts) == 1 and cols_l == in_w
        if need_hr:  # one tile: its gradient is returned itself, so it must not live in the workspace
            grad_tiles = [
                _scratch(None if whole else ws, f"grad_tile{t}", (in_h, cols_l, c), dtype, device).zero_()
                for t in range(len(ctx.tile_starts))
            ]
        grad_m = _scratch(ws, "grad_mats", tuple(mats.shape), dtype, device) if need_m else None
        grad = grad.contiguous()
        for first, last, t, rs in ctx.plan:
            g = grad[first:last]
            if need_hr:
                grad_tiles[t][rs : rs + rows_l].view(rows_l * cols_l, c).addmm_(mats[first:last].T, g)
            if need_m:
                block = tiles[t][rs : rs + rows_l].view(rows_l * cols_l, c)
                torch.mm(g, block.T, out=grad_m[first:last])
        grad_left = None
        if need_m:  # mats = left @ ax: d left = d mats @ ax^T
            grad_left = torch.bmm(grad_m.view(-1, rows_l, cols_l), ax.transpose(1, 2))
        grad_hr = None
        if need_hr:
            if whole:
                grad_hr = grad_tiles[0].view(in_h * in_w, c)
            else:
                # the tiles' gradients side by side: copied where one tile covers a column, added where
                # two overlap (no zero-filled buffer, no full-width additions)
                acc = mats.new_empty(in_h, in_w, c)
                done = 0  # columns [0, done) hold their final sums
                for s, gt in sorted(zip(ctx.tile_starts, grad_tiles), key=lambda st: st[0]):
                    if s > done:
                        acc[:, done:s].zero_()
                    overlap = max(0, min(done, s + cols_l) - s)
                    if overlap:
                        acc[:, s : s + overlap] += gt[:, :overlap]
                    if s + cols_l > done:
                        acc[:, s + overlap : s + cols_l] = gt[:, overlap:]
                        done = s + cols_l
                if done < in_w:
                    acc[:, done:].zero_()
                grad_hr = acc.view(in_h * in_w, c)
        return grad_hr, grad_left, None, None, None, None, None, None


def _blocks(lo: torch.Tensor, band: int, size: int, step: int) -> tuple[int, list[int], torch.Tensor]:
    """Blocks of ``band + step - 1`` (at most ``size``) consecutive indices starting every ``step``: each
    span ``lo .. lo + band - 1`` lies inside the block it is assigned. Returns (length, starts, assignment)."""
    length = min(band + step - 1, size)
    starts = sorted({min(s, size - length) for s in range(0, size - length + step, step)})
    assign = torch.searchsorted(torch.tensor(starts, device=lo.device), lo, right=True) - 1
    return length, starts, assign


#: grid steps of the fused pooling's row slabs and column tiles (larger: fewer, bigger GEMMs over more zeros)
POOL_ROW_STEP = 16
POOL_COL_STEP = 64


#: how :func:`fused_view_pool` multiplies: "auto" (sparse on the CPU in float32/float64, tiles otherwise),
#: "sparse" (one CSR matrix with a band-tight rectangle per window) or "tiles" (grouped dense GEMMs)
POOL_METHOD = "auto"


def fused_view_pool(
    hr: torch.Tensor,
    jitters: list[JitterParams],
    weights_fn: Callable[[torch.Tensor | None], torch.Tensor],
    salience: torch.Tensor | None,
    output_size: tuple[int, int],
    kernel_size: int,
    workspace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``window_pool(apply_jitter(hr, t_b), a_b)`` for every jitter ``t_b``, without any jittered map.

    Jitter and pooling are both linear in ``hr``, so their composition is one sparse operator per view: the
    window of output pixel ``(i, j)`` of view ``b`` reads a band of consecutive source rows and columns. Along
    each axis the jitter is a two-tap resampling, written as small dense matrices (``Ay`` (k, Ls) per output
    row, ``Ax`` (k, Lt) per output column); the window's pooling matrix is ``Ay^T a_ij Ax``, formed with
    batched matrix products (differentiable in ``a``). :data:`POOL_METHOD` picks how the windows are applied:
    on the CPU (float32/float64) all windows are the rows of one CSR matrix, each a rectangle as tight as
    its view's band (:func:`_sparse_view_pool`); elsewhere windows are grouped by (row slab, column tile)
    and each group is one dense GEMM with the slab of the pixel-major features (:class:`_TilePool`). Both
    equal the plain composition to float rounding, outputs and gradients.

    Args:
        hr: high-resolution features of the one image (channels-last memory avoids one copy).
        jitters: one per view.
        weights_fn: maps the jittered salience (B, H, W) (or None) to pooling weights (B or 1, h, w, k, k).
        salience: (1, 1, H, W) salience of ``hr`` (jittered here with the features' taps), or None.
        output_size: (h, w).
        kernel_size: window side k.
        workspace: a dict the caller keeps between calls; the tile path's largest temporaries reuse its
            memory (:func:`_scratch`; one forward per backward). None: fresh memory.

    Shape:
        - hr: (1, C, H, W)
        - output: (B, C, h, w)

    Raises:
        ValueError: :data:`POOL_METHOD` is not one of "auto", "sparse", "tiles"; weights of another shape.
    """
    _, _, in_h, in_w = hr.shape
    b, k = len(jitters), kernel_size
    taps = _jitter_taps(jitters, (in_h, in_w), hr.device)
    sal_views = _jitter_map(salience, taps)[:, 0] if salience is not None else None
    a = weights_fn(sal_views).to(hr.dtype).expand(b, -1, -1, -1, -1)  # (B, h, w, k, k), zero outside the map
    if tuple(a.shape[1:]) != (*output_size, k, k):
        raise ValueError(
            f"expected pooling weights (B, {output_size[0]}, {output_size[1]}, {k}, {k}), got {tuple(a.shape)}"
        )
    method = POOL_METHOD
    if method not in ("auto", "sparse", "tiles"):
        raise ValueError(f"expected POOL_METHOD 'auto', 'sparse' or 'tiles', got {method!r}")
    if method == "auto":
        cpu = hr.device.type == "cpu" and hr.dtype in (torch.float32, torch.float64)
        method = "sparse" if cpu else "tiles"
    if method == "sparse":
        return _sparse_view_pool(hr, taps, a, output_size)
    return _tile_view_pool(hr, taps, a, output_size, workspace)


def _window_sources(
    taps: tuple[torch.Tensor, ...], in_size: tuple[int, int], output_size: tuple[int, int], k: int
) -> tuple[torch.Tensor, ...]:
    """Where the pooling windows of every jittered view read the source map: per view and window row
    (column) the source rows (columns) of the jitter's two taps, their first one and the span to the last.

    Shape: taps from :func:`_jitter_taps` -> src_r (B, h, k, 2), src_c (B, w, k, 2), lo_r / span_r (B, h),
    lo_c / span_c (B, w) and the taps' weights at the windows wy_w (B, h, k, 2), wx_w (B, w, k, 2).
    """
    iy, wy, ix, wx = taps
    (in_h, in_w), (h, w) = in_size, output_size
    rows, _ = window_indices(in_h, h, k, iy.device)  # (h, k), clamped (their weights are zero)
    cols, _ = window_indices(in_w, w, k, ix.device)  # (w, k)
    src_r, src_c = iy[:, rows], ix[:, cols]  # (B, h, k, 2), (B, w, k, 2)
    lo_r, lo_c = src_r.flatten(2).amin(2), src_c.flatten(2).amin(2)  # (B, h), (B, w)
    span_r, span_c = src_r.flatten(2).amax(2) - lo_r, src_c.flatten(2).amax(2) - lo_c
    return src_r, src_c, lo_r, lo_c, span_r, span_c, wy[:, rows], wx[:, cols]


def _tile_view_pool(
    hr: torch.Tensor,
    taps: tuple[torch.Tensor, ...],
    a: torch.Tensor,
    output_size: tuple[int, int],
    workspace: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """:func:`fused_view_pool` with windows grouped by (row slab, column tile), one dense GEMM per group.

    Shape: hr (1, C, H, W), a (B, h, w, k, k) -> (B, C, h, w)
    """
    _, c, in_h, in_w = hr.shape
    h, w = output_size
    b, k = a.shape[0], a.shape[-1]
    dtype, device = hr.dtype, hr.device
    src_r, src_c, lo_r, lo_c, span_r, span_c, wy_w, wx_w = _window_sources(taps, (in_h, in_w), (h, w), k)
    band_r, band_c = int(span_r.max()) + 1, int(span_c.max()) + 1
    rows_l, row_starts, slab_of = _blocks(lo_r, band_r, in_h, POOL_ROW_STEP)
    cols_l, col_starts, tile_of = _blocks(lo_c, band_c, in_w, POOL_COL_STEP)
    rs = torch.tensor(row_starts, device=device)[slab_of]  # (B, h)
    cs = torch.tensor(col_starts, device=device)[tile_of]  # (B, w)
    # the jitter's two taps as dense matrices local to each slab / tile (constants: no gradient)
    ay = hr.new_zeros(b, h, k, rows_l).scatter_add_(3, src_r - rs[:, :, None, None], wy_w.to(dtype))
    ax = hr.new_zeros(b, w, k, cols_l).scatter_add_(3, src_c - cs[:, :, None, None], wx_w.to(dtype))
    # windows sorted by (row slab, column tile): each group is one GEMM
    key = slab_of[:, :, None] * len(col_starts) + tile_of[:, None, :]  # (B, h, w)
    order = torch.argsort(key.flatten(), stable=True)
    bi = torch.div(order, w, rounding_mode="floor")  # (view, row) index of each sorted window
    bj = torch.div(order, h * w, rounding_mode="floor") * w + order % w  # (view, column) index
    left = torch.matmul(ay.view(b * h, k, rows_l)[bi].transpose(1, 2), a.reshape(b * h * w, k, k)[order])
    n_win = order.numel()
    ax_n = _scratch(workspace, "ax", (n_win, k, cols_l), dtype, device)
    torch.index_select(ax.view(b * w, k, cols_l), 0, bj, out=ax_n)  # (N, k, Lt): mats = left @ ax_n
    keys = key.flatten()[order].tolist()
    slabs = rs.flatten()[bi].tolist()
    plan, first = [], 0
    for n in range(1, len(keys) + 1):
        if n == len(keys) or keys[n] != keys[first]:
            plan.append((first, n, keys[first] % len(col_starts), slabs[first]))
            first = n
    flat = hr.permute(0, 2, 3, 1).reshape(in_h * in_w, c)  # pixel-major (a view for channels-last hr)
    out = _TilePool.apply(flat, left, ax_n, plan, (in_h, in_w), col_starts, (rows_l, cols_l), workspace)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(order.numel(), device=device)
    return out[unsorted].view(b, h, w, c).permute(0, 3, 1, 2)


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from indices built here (valid by construction: no invariant check, no beta warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta state"
        return torch.sparse_csr_tensor(crow, col, vals, size, check_invariants=False)


def _rows_mm(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A @ x`` for the CSR matrix A (``crow``, ``col``, ``vals``), as a weighted embedding-bag sum: row
    ``r`` of the result is ``sum_e vals[e] x[col[e]]`` over ``crow[r] <= e < crow[r + 1]``. Why: the same
    sums in the same order as ``torch.sparse`` CSR products, with a faster CPU kernel and no zero-filled
    output.

    Shape: crow (R + 1,), col and vals (nnz,), x (P, C) -> (R, C)
    """
    return F.embedding_bag(col, x, crow[:-1], mode="sum", per_sample_weights=vals)


class _SparsePool(torch.autograd.Function):
    """out = A @ hr for the CSR matrix A with constant structure and differentiable values ``vals``
    (:func:`_rows_mm`).

    Backward: ``grad_hr = A^T grad`` through the transposed structure (``crow_t``, ``row_t``; entry ``e`` of
    A is entry ``dest[e]`` of A^T), ``grad_vals`` = the sampled product ``(hr grad^T)`` on A^T's pattern,
    taken back to A's order.

    Shape: hr (P, C), vals (nnz,) -> (N, C); ``plan`` = (crow, col, crow_t, row_t, dest, N, P).
    """

    @staticmethod
    def forward(ctx, hr, vals, plan):  # type: ignore[override]
        crow, col, _, _, _, n, p = plan
        out = _rows_mm(crow, col, vals, hr)
        ctx.plan = plan
        ctx.save_for_backward(hr, vals)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        hr, vals = ctx.saved_tensors
        _, _, crow_t, row_t, dest, n, p = ctx.plan
        grad = grad.contiguous()
        grad_hr = grad_vals = None
        vals_t = torch.empty_like(vals).scatter_(0, dest, vals)  # A's values in A^T's order
        if ctx.needs_input_grad[0]:
            grad_hr = _rows_mm(crow_t, row_t, vals_t, grad)
        if ctx.needs_input_grad[1]:  # on A^T's pixel-major pattern (each row of hr read once), then A's order
            sampled = torch.sparse.sampled_addmm(_csr(crow_t, row_t, vals_t, (p, n)), hr, grad.T, beta=0.0)
            grad_vals = sampled.values().index_select(0, dest)
        return grad_hr, grad_vals, None


def _sparse_view_pool(
    hr: torch.Tensor, taps: tuple[torch.Tensor, ...], a: torch.Tensor, output_size: tuple[int, int]
) -> torch.Tensor:
    """:func:`fused_view_pool` as one CSR product: window ``(b, i, j)`` is row ``(b h + i) w + j`` of A.

    Each window's pooling matrix ``Ay^T a_ij Ax`` is stored on a rectangle of ``Rb x Cb`` source pixels
    (``Rb``, ``Cb``: the largest row and column band of view ``b``'s windows, so a zoomed view's rectangles
    are smaller), placed at the window's first band row and column (moved inside the map where needed). Why:
    the multiply-adds are those of the rectangles, not of the tile path's dense slabs, which are mostly
    zeros. The transposed structure for the backward is built here from the rectangles' coverage counts
    (which windows of a view cover each source row and column), without sorting.

    Shape: hr (1, C, H, W), a (B, h, w, k, k) -> (B, C, h, w)
    """
    _, c, in_h, in_w = hr.shape
    h, w = output_size
    b, k = a.shape[0], a.shape[-1]
    dtype, device = hr.dtype, hr.device
    src_r, src_c, lo_r, lo_c, span_r, span_c, wy_w, wx_w = _window_sources(taps, (in_h, in_w), (h, w), k)
    band_r, band_c = span_r.amax(1) + 1, span_c.amax(1) + 1  # (B,): rectangle rows / columns per view
    r0 = torch.minimum(lo_r, in_h - band_r[:, None])  # (B, h): first rectangle row of each window row
    c0 = torch.minimum(lo_c, in_w - band_c[:, None])  # (B, w)
    size = band_r * band_c  # (B,) entries per window
    wy_w, wx_w = wy_w.to(dtype), wx_w.to(dtype)
    # coverage: how many rectangles of view v cover source row y (column x), and how many come before
    # window i (j) among them
    ys = torch.arange(in_h, device=device)
    xs = torch.arange(in_w, device=device)
    cov_r = (
        (ys[None, :, None] >= r0[:, None]) & (ys[None, :, None] < (r0 + band_r[:, None])[:, None])
    ).long()
    cov_c = (
        (xs[None, :, None] >= c0[:, None]) & (xs[None, :, None] < (c0 + band_c[:, None])[:, None])
    ).long()
    cnt_r, cnt_c = cov_r.sum(2), cov_c.sum(2)  # (B, H), (B, W)
    rank_r, rank_c = cov_r.cumsum(2) - cov_r, cov_c.cumsum(2) - cov_c  # (B, H, h), (B, W, w)
    per_view = cnt_r[:, :, None] * cnt_c[:, None, :]  # (B, H, W): entries of view v at each pixel
    crow_t = torch.cat([per_view.new_zeros(1), per_view.sum(0).flatten().cumsum(0)])
    start = crow_t[:-1].view(1, in_h, in_w) + per_view.cumsum(0) - per_view  # (B, H, W): view v's first slot
    n_win, n_pix = b * h * w, in_h * in_w
    bands = list(zip(band_r.tolist(), band_c.tolist()))
    nnz = h * w * sum(rb * cb for rb, cb in bands)
    # int32 indices where they fit (half the index traffic; the sparse kernels take either)
    index = torch.int32 if max(nnz, n_pix) < 2**31 - 1 else torch.long
    col = torch.empty(nnz, dtype=index, device=device)  # A's column (source pixel) of each entry
    dest = torch.empty(nnz, dtype=torch.long, device=device)  # its slot in A^T
    window_of = torch.empty(nnz, dtype=index, device=device)  # its row of A
    vals, off = [], 0
    i_idx, j_idx = torch.arange(h, device=device), torch.arange(w, device=device)
    # one weight tensor per view (unbind: one gradient buffer for all views, not one zeroed map per view)
    a_views = a.unbind(0)
    for v, (rb, cb) in enumerate(bands):
        ay = hr.new_zeros(h, k, rb).scatter_add_(2, src_r[v] - r0[v, :, None, None], wy_w[v])  # (h, k, Rb)
        ax = hr.new_zeros(w, k, cb).scatter_add_(2, src_c[v] - c0[v, :, None, None], wx_w[v])  # (w, k, Cb)
        left = torch.matmul(ay.transpose(1, 2)[:, None], a_views[v])  # (h, w, Rb, k)
        vals.append(torch.matmul(left, ax[None]).flatten())  # (h, w, Rb, Cb)
        m = h * w * rb * cb
        yv = r0[v][:, None] + torch.arange(rb, device=device)  # (h, Rb) source rows
        xv = c0[v][:, None] + torch.arange(cb, device=device)  # (w, Cb) source columns
        torch.add(
            (yv * in_w)[:, None, :, None], xv[None, :, None, :], out=col[off : off + m].view(h, w, rb, cb)
        )  # source pixel of each entry
        # slot of entry (i, j, dy, dx) in A^T's row of pixel (y, x): view v's first slot there, plus
        # (rank of i among the covering windows of row y) * (covering windows of column x) + (rank of j);
        # the first two terms depend on (i, dy, x) only: one (h, Rb, W) table, gathered at x = c0_j + dx
        ra = rank_r[v][yv, i_idx[:, None]]  # (h, Rb)
        rc = rank_c[v][xv, j_idx[:, None]]  # (w, Cb)
        table = start[v][yv] + ra[:, :, None] * cnt_c[v]  # (h, Rb, W)
        at_x = xv[None, :, None, :].expand(h, w, rb, cb)
        first = table[:, None].expand(h, w, rb, in_w).gather(3, at_x)  # (h, w, Rb, Cb)
        torch.add(first, rc[None, :, None], out=dest[off : off + m].view(h, w, rb, cb))
        window_of[off : off + m].view(h * w, rb * cb).copy_(
            torch.arange(v * h * w, (v + 1) * h * w, device=device)[:, None].expand(h * w, rb * cb)
        )
        off += m
    vals_all = torch.cat(vals)
    crow = torch.cat([size.new_zeros(1), size.repeat_interleave(h * w).cumsum(0)]).to(index)
    row_t = torch.empty(nnz, dtype=index, device=device).scatter_(0, dest, window_of)
    crow_t = crow_t.to(index)
    plan = (crow, col, crow_t, row_t, dest, n_win, n_pix)
    flat = hr.permute(0, 2, 3, 1).reshape(in_h * in_w, c)  # pixel-major (a view for channels-last hr)
    out = _SparsePool.apply(flat, vals_all, plan)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def _attention_weights(
    down: AttentionDownsampler, sal: torch.Tensor, in_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """:meth:`AttentionDownsampler.kernels` from an already computed (jittered) salience map (B, H, W)."""
    h, w = output_size
    k = down.kernel_size
    rows, vr = window_indices(in_size[0], h, k, sal.device)
    cols, vc = window_indices(in_size[1], w, k, sal.device)
    b = sal.shape[0]
    s = sal.index_select(1, rows.reshape(-1)).index_select(2, cols.reshape(-1))
    s = s.view(b, h, k, w, k).permute(0, 1, 3, 2, 4)
    logits = s * down.weight.to(s.dtype) + down.bias.to(s.dtype)
    return _masked_softmax(logits, vr[:, None, :, None] & vc[None, :, None, :])


def _salience(
    down: AttentionDownsampler, hr: torch.Tensor, workspace: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """``down.salience(hr)`` for one pixel-major (channels-last) map, as one matrix-vector product.

    In training the dropout mask is drawn from 31 random bits per element (``keep = bits < (1 - p) 2^31``:
    the same distribution as ``nn.Dropout``'s up to 2^-31, at a fifth of ``bernoulli_``'s cost on a CPU).
    The random bits and the mask reuse ``workspace``'s memory (:func:`_scratch`) when one is given.

    Shape:
        - hr: (1, C, H, W)
        - output: (1, 1, H, W)
    """
    drop, conv = down.salience_net[0], down.salience_net[1]
    _, c, in_h, in_w = hr.shape
    flat = hr.permute(0, 2, 3, 1).reshape(in_h * in_w, c)  # a view of channels-last memory
    weight = conv.weight.view(1, c).to(hr.dtype)
    if down.training and drop.p > 0:
        bits = _scratch(workspace, "bits", tuple(flat.shape), torch.int32, flat.device).random_()
        keep = _scratch(workspace, "keep", tuple(flat.shape), flat.dtype, flat.device)
        torch.lt(bits, round((1.0 - drop.p) * 2**31), out=keep)  # 1.0 kept, 0.0 dropped
        flat, weight = flat * keep, weight / (1.0 - drop.p)
    return (flat @ weight.T + conv.bias.to(hr.dtype)).view(1, 1, in_h, in_w)


def pool_views(
    down: nn.Module,
    hr: torch.Tensor,
    extra: torch.Tensor | None,
    jitters: list[JitterParams],
    output_size: tuple[int, int],
    *,
    fused: bool,
    workspace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``down(t_b(F_hr))`` for every jitter; ``extra`` channels (e.g. ``|F_hr|``) are pooled with the same
    weights but do not enter the salience. ``fused`` selects :func:`fused_view_pool` over the plain path;
    ``workspace`` (fused only) is a dict kept between calls whose memory the temporaries reuse.

    Shape:
        - hr: (1, k, H, W); extra: (1, e, H, W) or None
        - output: (B, k + e, h, w)
    """
    both = torch.cat([hr, extra], 1) if extra is not None else hr
    n, in_size = len(jitters), (hr.shape[-2], hr.shape[-1])
    attention = isinstance(down, AttentionDownsampler)
    if not fused:
        views = apply_jitter(both.expand(n, -1, -1, -1), jitters)
        if extra is None:
            return down(views, output_size)
        return window_pool(views, down.kernels(views[:, : hr.shape[1]], output_size), output_size)
    if attention:
        sal = _salience(down, hr, workspace)  # dropout + 1x1 conv once; jittered as one channel

        def weights(s: torch.Tensor | None) -> torch.Tensor:
            return _attention_weights(down, s, in_size, output_size)  # type: ignore[arg-type]

    else:
        sal = None

        def weights(s: torch.Tensor | None) -> torch.Tensor:
            return down.kernels(hr, output_size)

    return fused_view_pool(both, jitters, weights, sal, output_size, down.kernel_size, workspace)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 Gaussian blur (sigma 1, reflect borders), separable, per channel. (B,C,H,W) -> same."""
    t = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    g = torch.exp(-0.5 * t.square())
    g = g / g.sum()
    c = x.shape[1]
    pad_mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    y = F.conv2d(F.pad(x, (0, 0, 2, 2), mode=pad_mode), g.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)
    return F.conv2d(F.pad(y, (2, 2, 0, 0), mode=pad_mode), g.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)


class _ChannelNorm(torch.autograd.Function):
    """``torch.linalg.vector_norm(x, dim=1, keepdim=True)`` whose backward is one pass over ``x``
    (``x * (grad / norm)``, zero where the norm is zero) instead of vector_norm's three (divide, mask,
    multiply). Shape: (B, C, H, W) -> (B, 1, H, W)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))
        return x * scale


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 norm over channels. Shape: (B, C, H, W) -> (B, 1, H, W)."""
    return _ChannelNorm.apply(x)


def _plain_magnitude(x: torch.Tensor) -> torch.Tensor:
    """:func:`_magnitude` with torch's own backward (the plain path's)."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _tv(hr: torch.Tensor) -> torch.Tensor:
    """:func:`featup.core.losses.tv_loss` (eq. 8) on :func:`_magnitude` (its cheaper backward). Scalar."""
    mag = _magnitude(hr)[:, 0]
    dy = (mag[:, 1:, :] - mag[:, :-1, :]).square().sum()
    dx = (mag[:, :, 1:] - mag[:, :, :-1]).square().sum()
    return (dy + dx) / mag.numel()


# ----------------------------------------------------------------------------------------------------------
# the front


def fit_implicit(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    steps: int | None = None,
    *,
    preset: str = "default",
    upsampler_kwargs: dict[str, Any] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: str = "float32",
    callback: mv.Callback | None = None,
    **overrides: Any,
) -> ImplicitUpsampler:
    """Fit FeatUp's implicit upsampler to one image.

    The image's features ``f(x)`` are compressed to their top ``pca_dim`` principal components; each step
    takes ``n_jitters`` jittered views, renders the compressed high-resolution features ``F_hr`` of the
    implicit network (eq. 7) and minimises eq. 1 between ``PCA(f(t(x)))`` and ``down(t(F_hr))``, plus
    ``tv_weight`` times the total variation of ``|F_hr|`` (eq. 8), ``mag_weight`` times the squared error
    of the pooled ``|F_hr|`` against ``|PCA(f(t(x)))|`` and ``blur_pin`` times ``mean (blur(F_hr) - F_hr)^2``
    (the original code's two extra regularisers). NAdam. Measured rationale of the defaults:
    docs/decisions.md#implicit.

    Args:
        backbone: frozen feature extractor ``(B,3,H,W) -> (B,C,h,w)``, called under ``torch.no_grad`` with
            the views batched (an ``nn.Module`` is put in eval mode for the run).
        image: the image to fit, RGB in [0, 1].
        steps: total optimiser steps (None: the preset's; a resumed fit continues up to this count).
        preset: "default" or "paper" (Table 7: 2000 steps, made for a GPU).
        upsampler_kwargs: extra ``ImplicitUpsampler`` arguments (``hidden_dim``, ``n_freqs``, ...).
        checkpoint_path: file for the resumable training state (network, downsampler, head, optimizer, step),
            written every ``checkpoint_every`` steps and at the end; None disables it.
        resume: continue from ``checkpoint_path`` if present (a fit of the same image and settings).
        progress: show a tqdm bar.
        device: training device; default the backbone's parameter device, else CPU.
        precision: "float32", "bfloat16" or "float16", as in :func:`train_jbu` (the PCA and the targets'
            projection onto it are computed in float32).
        callback: ``callback(step, logs)`` after each step; returning True stops early.
        **overrides: fields of :class:`ImplicitFitConfig` on top of the preset (see ``PRESETS``).

    Returns:
        The fitted :class:`ImplicitUpsampler` in eval mode; ``render(size)`` gives ``(1,C,H',W')`` features
        in the backbone's space at any size.

    Raises:
        TypeError, ValueError: a setting or input of the wrong type or range (named in the message).
        CheckpointError: the state at ``checkpoint_path`` belongs to another image or other settings.

    Shape:
        - image: (1, 3, H, W)
        - backbone output: (B, C, h, w)
    """
    if steps is not None:
        overrides["steps"] = steps
    cfg = ImplicitFitConfig.from_preset(preset, **overrides)
    mv.check_callables(backbone, callback)
    check_training_precision(precision)
    image = validate_images(image, "image")
    if image.shape[0] != 1:
        raise ValueError(f"expected one image (1,3,H,W) to fit, got shape {tuple(image.shape)}")
    if upsampler_kwargs is not None and not isinstance(upsampler_kwargs, dict):
        raise TypeError(f"expected upsampler_kwargs as a dict or None, got {type(upsampler_kwargs).__name__}")
    device = mv.resolve_device(backbone, device)
    with mv.frozen(backbone), mv.training_context(device):
        return _fit_implicit(
            backbone,
            image.to(device).clone(),  # a normal tensor even if the caller made it under inference_mode
            cfg,
            upsampler_kwargs=dict(upsampler_kwargs or {}),
            checkpoint_path=checkpoint_path,
            resume=resume,
            progress=progress,
            device=device,
            precision=precision,
            callback=callback,
        )


# ----------------------------------------------------------------------------------------------------------
# the fitter, one named step at a time


@dataclass
class _Fit:
    """The pieces of one fit that outlive a step."""

    imp: ImplicitUpsampler
    down: nn.Module
    head: nn.Module | None
    pca: PCA  # the upsampler's (zero-padded to imp.pca_dim components)
    bank: tuple[list[JitterParams], torch.Tensor] | None  # jitters and their compressed targets
    modules: dict[str, nn.Module]  # what the checkpoint holds: upsampler, downsampler, head
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    #: memory the fused pooling's temporaries reuse from step to step (see :func:`_scratch`)
    workspace: dict[str, torch.Tensor] = field(default_factory=dict)


def _fit_implicit(
    backbone: Callable,
    image: torch.Tensor,
    cfg: ImplicitFitConfig,
    *,
    upsampler_kwargs: dict[str, Any],
    checkpoint_path: str | os.PathLike | None,
    resume: bool,
    progress: bool,
    device: torch.device,
    precision: str,
    callback: mv.Callback | None,
) -> ImplicitUpsampler:
    saved = None
    if checkpoint_path is not None and resume and _st_path(checkpoint_path).is_file():
        saved = mv.load_run(checkpoint_path, "implicit", cfg.hparams(), precision, device, _LEGACY_HPARAMS)
    lr_feats = mv.view_features(backbone, image, precision, "image")
    fit = _build_fit(backbone, image, lr_feats, cfg, upsampler_kwargs, saved, checkpoint_path, precision)
    start = 0
    if saved is not None:
        start = mv.restore_run(saved, fit.modules, fit.optimizer, fit.scaler, checkpoint_path)  # type: ignore[arg-type]
        if not torch.equal(fit.imp.image.to(image.dtype), image):  # the stored guidance image
            raise CheckpointError(f"cannot resume from {checkpoint_path}: it was fitted to a different image")

    def step_fn(step: int) -> dict[str, float]:
        mv.seed_rngs(derive_seed(cfg.seed, "dropout", 0, step), device)
        jitters, targets = _step_views(backbone, image, cfg, fit.bank, fit.pca, step, precision)
        terms = _objective(
            fit.imp, fit.down, fit.head, image, jitters, targets, cfg, precision, fit.workspace
        )
        mv.optimizer_step(fit.optimizer, fit.scaler, terms["loss"], cfg.lr * lr_factor(cfg, step))
        return mv.step_logs(
            **{k: v.detach() for k, v in terms.items()}, lr=fit.optimizer.param_groups[0]["lr"]
        )

    def save(step: int) -> None:
        if checkpoint_path is None:
            return
        config = {
            "hparams": cfg.hparams(),
            "feat_dim": int(lr_feats.shape[1]),
            "upsampler": {"class": type(fit.imp).__name__, "kwargs": fit.imp.config()},
        }
        mv.save_run(
            checkpoint_path, "implicit", step, fit.modules, fit.optimizer, fit.scaler, precision, config
        )

    for m in fit.modules.values():
        m.train()
    mv.run_steps(
        step_fn,
        start,
        cfg.steps,
        save=save,
        checkpoint_every=cfg.checkpoint_every,
        callback=callback,
        progress=progress,
        desc="fit_implicit",
    )
    for m in fit.modules.values():
        m.eval()
    return fit.imp


def _build_fit(
    backbone: Callable,
    image: torch.Tensor,
    lr_feats: torch.Tensor,
    cfg: ImplicitFitConfig,
    upsampler_kwargs: dict[str, Any],
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    checkpoint_path: str | os.PathLike | None,
    precision: str,
) -> _Fit:
    """The view bank, the PCA, the implicit network (fresh or as saved), downsampler, head and optimiser."""
    device = image.device
    feat_dim = int(lr_feats.shape[1])
    out_size = tuple(lr_feats.shape[-2:])
    mv.seed_rngs(derive_seed(cfg.seed, "init"), device)
    bank = _make_bank(backbone, image, cfg, precision)
    pca = _fit_pca(backbone, image, lr_feats, cfg, bank, precision)
    kwargs: dict[str, Any] = {
        "feat_dim": feat_dim,
        "image_size": list(image.shape[-2:]),
        "pca_dim": cfg.pca_dim,
        **({"dropout_mode": cfg.dropout_mode} if cfg.dropout_mode != "element" else {}),
        **({"residual": True, "lr_size": list(out_size)} if cfg.residual else {}),
        **({"consistency": True, "lr_size": list(out_size)} if cfg.consistency else {}),
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
    if imp.residual:
        imp.set_base(pca.transform(lr_feats))
    if imp.consistency:
        imp.set_lr(lr_feats)
    if bank is not None:  # the bank keeps only the compressed targets
        bank = (bank[0], pca.transform(bank[1]))
    # kernel_size None: the backbone's stride (the window of one low-resolution pixel)
    kernel = cfg.kernel_size or max(1, round(image.shape[-2] / out_size[0]))
    down, head = mv.loss_modules(cfg.downsampler, n_comp, kernel, uncertainty=cfg.uncertainty)
    down = down.to(device)
    head = head.to(device) if head is not None else None
    modules: dict[str, nn.Module] = {"upsampler": imp, "downsampler": down}
    if head is not None:
        modules["head"] = head
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.NAdam(params, lr=cfg.lr)
    scaler = mv.make_grad_scaler(precision, device)  # enabled for float16 only
    return _Fit(imp, down, head, pca, bank, modules, optimizer, scaler)


def _view_features(
    backbone: Callable,
    image: torch.Tensor,
    jitters: list[JitterParams],
    batch: int,
    precision: str,
    what: str,
) -> torch.Tensor:
    """Backbone features (float32) of the jittered views, ``batch`` views per call. (N, C, h, w)."""
    out = []
    for start in range(0, len(jitters), batch):
        chunk = jitters[start : start + batch]
        views = apply_jitter(image.expand(len(chunk), -1, -1, -1), chunk)
        out.append(mv.view_features(backbone, views, precision, what))
    return torch.cat(out)


def _draw_jitters(cfg: ImplicitFitConfig, gen: torch.Generator, n: int) -> list[JitterParams]:
    return mv.draw_jitters(
        gen, n, max_pad=cfg.max_pad, max_zoom=cfg.max_zoom, p_zoom=cfg.p_zoom, p_flip=cfg.p_flip
    )


def _fit_pca(
    backbone: Callable,
    image: torch.Tensor,
    lr_feats: torch.Tensor,
    cfg: ImplicitFitConfig,
    bank: tuple[list[JitterParams], torch.Tensor] | None,
    precision: str,
) -> PCA:
    """PCA on the map's pixels plus those of ``pca_views`` jittered views (the bank's first, else drawn)."""
    samples = [lr_feats]
    if cfg.pca_views > 0:
        if bank is not None and len(bank[0]) >= cfg.pca_views:
            samples.append(bank[1][: cfg.pca_views])
        else:
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "pca_views"))
            jitters = _draw_jitters(cfg, gen, cfg.pca_views)
            samples.append(_view_features(backbone, image, jitters, cfg.n_jitters, precision, "PCA views"))
    feat_dim = int(lr_feats.shape[1])
    return PCA(feat_dim, cfg.pca_dim).to(lr_feats.device).fit(torch.cat(samples))


def _make_bank(
    backbone: Callable, image: torch.Tensor, cfg: ImplicitFitConfig, precision: str
) -> tuple[list[JitterParams], torch.Tensor] | None:
    """The seeded bank of jittered views and their backbone features, or None (fresh views per step)."""
    if cfg.bank_size is None:
        return None
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "bank"))
    jitters = _draw_jitters(cfg, gen, cfg.bank_size)
    return jitters, _view_features(backbone, image, jitters, cfg.n_jitters, precision, "view bank")


def _step_views(
    backbone: Callable,
    image: torch.Tensor,
    cfg: ImplicitFitConfig,
    bank: tuple[list[JitterParams], torch.Tensor] | None,
    pca: PCA,
    step: int,
    precision: str,
) -> tuple[list[JitterParams], torch.Tensor]:
    """This step's jitters and their PCA-compressed targets (from the bank, or freshly computed)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "jitter", 0, step))
    if bank is None:
        jitters = _draw_jitters(cfg, gen, cfg.n_jitters)
        views = apply_jitter(image.expand(cfg.n_jitters, -1, -1, -1), jitters)
        feats = mv.view_features(backbone, views, precision, f"jittered views, step {step}")
        with torch.no_grad():
            return jitters, pca.transform(feats)
    n_bank = len(bank[0])
    if cfg.n_jitters <= n_bank:
        idx = torch.randperm(n_bank, generator=gen)[: cfg.n_jitters]
    else:
        idx = torch.randint(n_bank, (cfg.n_jitters,), generator=gen)
    return [bank[0][i] for i in idx.tolist()], bank[1][idx.to(bank[1].device)]


def _objective(
    imp: ImplicitUpsampler,
    down: nn.Module,
    head: nn.Module | None,
    image: torch.Tensor,
    jitters: list[JitterParams],
    targets: torch.Tensor,
    cfg: ImplicitFitConfig,
    precision: str,
    workspace: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The step's loss and its terms: eq. 1 over the views, TV (eq. 8), magnitude and blur-pin terms.
    ``workspace``: the fit's reusable memory for the fused pooling (:func:`_scratch`)."""
    device = image.device
    out_size = (int(targets.shape[-2]), int(targets.shape[-1]))
    k = int(targets.shape[1])
    # the fast path's one-pass backwards; the plain path keeps the plain ops (bitwise its reference)
    magnitude, tv_of = (_magnitude, _tv) if cfg.fused else (_plain_magnitude, tv_loss)
    with mixed_precision(precision, device):
        hr = imp.forward_compressed(image)
        extra = magnitude(hr) if cfg.mag_weight > 0 else None
        pooled = pool_views(down, hr, extra, jitters, out_size, fused=cfg.fused, workspace=workspace)
        log_scale = head(targets) if head is not None else None
    # under mixed precision the loss is still computed in float32
    with full_precision(device):
        hr, pooled = to_float32(hr), to_float32(pooled)
        zero = hr.new_zeros(())
        rec = mv.view_loss(pooled[:, :k], targets, log_scale)
        tv = tv_of(hr) if cfg.tv_weight > 0 else zero
        mag = (pooled[:, k:] - magnitude(targets)).square().mean() if cfg.mag_weight > 0 else zero
        pin = (_gaussian_blur(hr) - hr).square().mean() if cfg.blur_pin > 0 else zero
        loss = rec + cfg.tv_weight * tv + cfg.mag_weight * mag + cfg.blur_pin * pin
    return {"loss": loss, "rec_loss": rec, "tv_loss": tv, "mag_loss": mag, "blur_pin_loss": pin}


def _st_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_suffix(path.suffix + ".safetensors")
