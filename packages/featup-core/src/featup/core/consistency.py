"""Back-projection: make an upsampled map average-pool back exactly to the low-res features it came from.

``back_project(hr, lr) = hr + U(M^-1 (lr - D(hr)))`` with ``D`` the area average onto the low-res cells,
``U`` a bicubic resize and ``M = D U`` (separable, an ``h x h`` and a ``w x w`` matrix, well conditioned:
condition number 1.4-2.2 for ratios >= 1.5), so that ``D(back_project(hr, lr)) = lr`` to float rounding.
``U M^-1`` is applied as two small matrix products per channel. It
keeps what the upsampler put inside each cell and replaces the cell means by the backbone's own: the output
stays in the backbone's feature space. Linear in ``(hr, lr)`` and differentiable. It is iterative
back-projection (Irani & Peleg 1991) solved in one step. Measured rationale: docs/decisions.md, "Consistency".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["BACK_PROJECTION_MODES", "back_project", "block_mean", "lift_rows", "pool_to"]

#: how the low-res correction is resized to the output
BACK_PROJECTION_MODES = ("bicubic", "bilinear")


def pool_to(hr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area average of ``hr`` (B, C, H, W) onto a ``size`` grid (the cell means when the sizes divide)."""
    (hh, hw), (h, w) = hr.shape[-2:], size
    if hh % h == 0 and hw % w == 0:
        return block_mean(hr, hh // h, hw // w)
    return F.adaptive_avg_pool2d(hr, size)


def block_mean(x: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """Means of the ``fy x fx`` blocks of ``x`` (``F.avg_pool2d(x, (fy, fx))`` to float rounding), as two
    sums over views: the rows of each block first (whole contiguous rows added), then the columns of the
    (fy times smaller) result. Several times faster than ``avg_pool2d``'s per-window loop on large maps.

    Shape:
        - x: (..., H, W) with fy dividing H and fx dividing W (at least 3 dims unless contiguous)
        - output: (..., H / fy, W / fx)

    Raises:
        ValueError: a block size that does not divide the map.
    """
    hh, hw = x.shape[-2:]
    if fy < 1 or fx < 1 or hh % fy or hw % fx:
        raise ValueError(f"expected block sizes dividing the map {(hh, hw)}, got {(fy, fx)}")
    if not x.is_contiguous() and x.dim() in (3, 4):  # a reshape would copy the map: pool it in place
        return F.avg_pool2d(x, (fy, fx))
    lead = x.shape[:-2]
    rows = x.reshape(*lead, hh // fy, fy, hw).sum(-2)
    cols = rows.reshape(*lead, hh // fy, hw // fx, fx)
    if fx > 4:
        return cols.sum(-1).div_(fy * fx)
    out = cols[..., 0].clone()  # a sum over a short innermost dim is slow in torch: add strided views
    for k in range(1, fx):
        out += cols[..., k]
    return out.div_(fy * fx)


@functools.lru_cache(maxsize=64)
def _lift_factors(n: int, big: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, (D U)^-1)`` along one axis, (big, n) and (n, n) float64 on the CPU: ``U`` resizes ``n -> big``
    samples (the resize of an identity, so borders are exactly ``F.interpolate``'s), ``D`` pools them back.

    Built outside inference mode: the cached matrices are shared by later calls that need autograd."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
        resize = F.interpolate(eye, size=(big, 1), mode=mode, align_corners=False)[:, 0, :, 0].T  # (big, n)
        pool = F.adaptive_avg_pool1d(torch.eye(big, dtype=torch.float64).view(big, 1, big), n)[:, 0, :].T
        return resize, torch.linalg.inv(pool @ resize)


@functools.lru_cache(maxsize=64)
def _lift(n: int, big: int, mode: str) -> torch.Tensor:
    """``U (D U)^-1`` along one axis, (big, n) float64 on the CPU (see :func:`_lift_factors`)."""
    with torch.inference_mode(False), torch.no_grad():
        resize, inverse = _lift_factors(n, big, mode)
        return resize @ inverse


@functools.lru_cache(maxsize=64)
def _lift_taps(n: int, big: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` of :func:`_lift_factors` as taps: row ``y`` of ``U`` is ``weights[y]`` on the ``taps``
    consecutive samples from ``start[y]`` (every other entry of the row is zero). float64 weights (big, taps),
    int64 start (big,)."""
    with torch.inference_mode(False), torch.no_grad():
        resize = _lift_factors(n, big, mode)[0]
        cols = torch.arange(n)
        nonzero = resize.ne(0)
        lo = torch.where(nonzero, cols, n).min(1).values.clamp(max=n - 1)
        hi = torch.where(nonzero, cols, -1).max(1).values
        taps = max(1, int((hi - lo + 1).max()))
        start = lo.clamp(max=n - taps)
        weights = resize.gather(1, start[:, None] + torch.arange(taps))
        return weights, start


def lift_rows(
    residual: torch.Tensor, size: tuple[int, int], mode: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The back-projection's correction ``U_y M_y^-1 r M_x^-T U_x^T`` (see :func:`back_project`) in a form
    added row by row: ``correction[..., y, :] = sum_t weights[y, t] * rows[..., start[y] + t, :]``, with ``U_y``'s
    few taps per row (4 for bicubic). The JBU's last stage adds it as it writes each output row.

    Args:
        residual: ``lr - pool_to(hr, lr.shape[-2:])``, the low-res residual ``r``.
        size: the output's (H, W).
        mode: ``U``, one of :data:`BACK_PROJECTION_MODES`.

    Shape:
        - residual: (B, C, h, w)
        - output: rows (B, C, h, W) in the residual's dtype, weights (H, taps) in that dtype, start (H,) int64

    Raises:
        ValueError: a bad ``mode``, or an output smaller than the residual.
    """
    if mode not in BACK_PROJECTION_MODES:
        raise ValueError(f"expected mode in {BACK_PROJECTION_MODES}, got {mode!r}")
    (h, w), (big_h, big_w) = residual.shape[-2:], (int(size[0]), int(size[1]))
    if big_h < h or big_w < w:
        raise ValueError(
            f"expected an output at least as large as the residual {(h, w)}, got {(big_h, big_w)}"
        )
    dev, dtype = residual.device, residual.dtype
    inverse_y = _lift_factors(h, big_h, mode)[1].to(dev, dtype)
    lift_x = _lift(w, big_w, mode).to(dev, dtype)
    rows = torch.matmul(inverse_y, residual) @ lift_x.T
    weights, start = _lift_taps(h, big_h, mode)
    return rows, weights.to(dev, dtype), start.to(dev)


def back_project(
    hr: torch.Tensor,
    lr: torch.Tensor,
    *,
    mode: str = "bicubic",
    inplace: bool = False,
    chunk_channels: int = 64,
    hr_means: torch.Tensor | None = None,
) -> torch.Tensor:
    """``hr`` corrected so that its area average onto ``lr``'s grid is ``lr``; see the module docstring.

    Args:
        hr: upsampled features.
        lr: the low-resolution features ``hr`` was upsampled from.
        mode: ``U``, one of :data:`BACK_PROJECTION_MODES`.
        inplace: add into ``hr``, ``chunk_channels`` channels at a time (working memory of one chunk instead
            of a second output); only without autograd.
        chunk_channels: channels per chunk with ``inplace``.
        hr_means: ``pool_to(hr, lr.shape[-2:])`` if the caller already has it (the JBU's last stage takes it
            as it writes ``hr``): saves a pass over ``hr``. Trusted as given (only its shape is checked).

    Shape:
        - hr: (B, C, H, W) with H >= h and W >= w
        - lr: (B, C, h, w)
        - output: (B, C, H, W)

    Raises:
        ValueError: mismatched shapes, an output smaller than ``lr``, a bad ``mode`` / ``chunk_channels``, or
            ``inplace`` on a tensor that requires grad.
    """
    if mode not in BACK_PROJECTION_MODES:
        raise ValueError(f"expected mode in {BACK_PROJECTION_MODES}, got {mode!r}")
    if hr.dim() != 4 or lr.dim() != 4 or hr.shape[:2] != lr.shape[:2]:
        raise ValueError(
            f"expected hr (B,C,H,W) and lr (B,C,h,w) with the same B and C, got {tuple(hr.shape)} and "
            f"{tuple(lr.shape)}"
        )
    size, lr_size = tuple(hr.shape[-2:]), tuple(lr.shape[-2:])
    if size[0] < lr_size[0] or size[1] < lr_size[1]:
        raise ValueError(f"expected an output at least as large as lr {lr_size}, got {size}")
    if inplace and hr.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True needs a tensor without autograd: hr requires grad")
    chunk = int(chunk_channels)
    if chunk < 1:
        raise ValueError(f"expected chunk_channels >= 1, got {chunk_channels}")
    # U M^-1 is separable: two small matrix products per channel instead of a bicubic resize (4x faster);
    # the second accumulates onto hr inside the GEMM (docs/decisions.md#perf-kernel-op)
    lift_y = _lift(lr_size[0], size[0], mode).to(hr.device, hr.dtype)
    lift_x = _lift(lr_size[1], size[1], mode).to(hr.device, hr.dtype)
    if hr_means is None:
        hr_means = pool_to(hr, lr_size)
    elif hr_means.shape != lr.shape:
        raise ValueError(f"expected hr_means of lr's shape {tuple(lr.shape)}, got {tuple(hr_means.shape)}")
    rows = (lr.to(hr.dtype) - hr_means.to(hr.dtype)) @ lift_x.T  # (B, C, h, W)
    (n_b, n_c), (big_h, big_w), h = hr.shape[:2], size, lr_size[0]
    if not inplace:
        # one batched GEMM accumulating onto hr (beta = 1): no separate correction map to add
        flat = hr.reshape(n_b * n_c, big_h, big_w)
        lifted = torch.baddbmm(flat, lift_y.expand(n_b * n_c, big_h, h), rows.reshape(n_b * n_c, h, big_w))
        return lifted.view(hr.shape)
    for i in range(n_b):
        for c in range(0, n_c, chunk):
            block = hr[i, c : c + chunk]  # the GEMM accumulates into hr itself: no chunk-sized temporary
            block.baddbmm_(lift_y.expand(block.shape[0], big_h, h), rows[i, c : c + chunk])
    return hr
