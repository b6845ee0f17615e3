"""A cheap back-projection step: make an upsampled map average-pool back to the low-resolution features.

``backproject(out, lr_feats)`` returns ``out + up(lr_feats - pool(out))``: the residual between the
low-resolution features and the output average-pooled back to their grid (``F.adaptive_avg_pool2d``),
resized to the output's size (``F.interpolate``, bicubic by default, ``align_corners=False``) and added to the
output. Both resamplings are separable and linear, so they run as small matrix products with torch's own
1-D weights (the resampling of an identity: borders and window rules are exactly torch's), and the add is
fused into the last product. No map of the output's size is allocated besides the result (none at all when
it works in place): the pooling reads the output once and the update writes it once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["backproject", "backproject_reference"]

_MODES = ("bicubic", "bilinear")


@functools.lru_cache(maxsize=32)
def _weights(n_in: int, n_out: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in): row i holds the 1-D weights that make output sample i (pooling or interpolation)."""
    with torch.inference_mode(False), torch.no_grad():  # cached: usable in and out of inference mode
        calc = torch.float64
        eye = torch.eye(n_in, dtype=calc).view(1, n_in, n_in, 1)  # channel j = the j-th unit impulse
        if kind == "pool":
            mapped = F.adaptive_avg_pool2d(eye, (n_out, 1))
        else:
            mapped = F.interpolate(eye, size=(n_out, 1), mode=kind, align_corners=False)
        return mapped[0, :, :, 0].t().contiguous().to(dtype)  # (n_out, n_in)


def _check(out: torch.Tensor, lr_feats: torch.Tensor, mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"expected mode in {_MODES}, got {mode!r}")
    if out.dim() != 4 or lr_feats.dim() != 4 or out.shape[:2] != lr_feats.shape[:2]:
        raise ValueError(
            "expected out (B, C, H, W) and lr_feats (B, C, h, w) with the same B and C, got "
            f"{tuple(out.shape)} and {tuple(lr_feats.shape)}"
        )
    if lr_feats.shape[-2] > out.shape[-2] or lr_feats.shape[-1] > out.shape[-1]:
        raise ValueError(
            f"expected lr_feats no larger than out, got {tuple(lr_feats.shape)} and {tuple(out.shape)}"
        )
    if not (out.dtype.is_floating_point and lr_feats.dtype == out.dtype):
        raise ValueError(
            f"expected floating-point tensors of one dtype, got {out.dtype} and {lr_feats.dtype}"
        )


def backproject_reference(out: torch.Tensor, lr_feats: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """The definition, with ``F.adaptive_avg_pool2d`` and ``F.interpolate`` (the test oracle).

    Shape:
        - out: (B, C, H, W); lr_feats: (B, C, h, w); output: (B, C, H, W)
    """
    _check(out, lr_feats, mode)
    residual = lr_feats - F.adaptive_avg_pool2d(out, lr_feats.shape[-2:])
    return out + F.interpolate(residual, size=out.shape[-2:], mode=mode, align_corners=False)


def backproject(
    out: torch.Tensor, lr_feats: torch.Tensor, mode: str = "bicubic", *, inplace: bool | None = None
) -> torch.Tensor:
    """``out + up(lr_feats - pool(out))`` with separable matrix products (equal to
    :func:`backproject_reference` to float rounding).

    Args:
        out: the upsampled features.
        lr_feats: the low-resolution features ``out`` should pool back to.
        mode: how the residual is resized: ``"bicubic"`` (default) or ``"bilinear"``.
        inplace: add into ``out`` itself (no second output-sized buffer) and return it. ``None`` (default):
            in place unless autograd records the call (then a new tensor, so gradients stay correct).

    Raises:
        ValueError: wrong ranks, different batch or channels, ``lr_feats`` larger than ``out``, non-float or
            mixed dtypes, an unknown mode.

    Shape:
        - out: (B, C, H, W); lr_feats: (B, C, h, w); output: (B, C, H, W)
    """
    _check(out, lr_feats, mode)
    b, c, big_h, big_w = out.shape
    h, w = lr_feats.shape[-2:]
    dtype = out.dtype
    pool_y, pool_x = _weights(big_h, h, "pool", dtype), _weights(big_w, w, "pool", dtype)
    up_y, up_x = _weights(h, big_h, mode, dtype), _weights(w, big_w, mode, dtype)
    dev = out.device
    pool_y, pool_x, up_y, up_x = (t.to(dev) for t in (pool_y, pool_x, up_y, up_x))
    pooled = torch.matmul(pool_y, torch.matmul(out, pool_x.t()))  # (B, C, h, w): one read of out
    rows = torch.matmul(up_y, lr_feats - pooled)  # (B, C, H, w), small
    if inplace is None:
        inplace = not (torch.is_grad_enabled() and (out.requires_grad or lr_feats.requires_grad))
    flat_rows = rows.reshape(b * c, big_h, w)
    cols = up_x.t().expand(b * c, w, big_w)
    if inplace and out.is_contiguous():
        out.view(b * c, big_h, big_w).baddbmm_(flat_rows, cols)  # one write of out
        return out
    if inplace:
        return out.add_(torch.bmm(flat_rows, cols).view_as(out))
    return torch.baddbmm(out.reshape(b * c, big_h, big_w), flat_rows, cols).view(b, c, big_h, big_w)
