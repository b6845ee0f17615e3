"""featup.kernels: the fused adaptive convolution (CPU and CUDA) behind FeatUp's JBU upsampler.

``adaptive_conv(input, filters)`` runs the compiled ``torch.ops.featup.adaptive_conv`` op (differentiable in
both arguments, ``torch.compile``-able, autocast-aware); ``adaptive_conv_reference`` is the pure-PyTorch
oracle with identical semantics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from featup.kernels import _ops
from featup.kernels._build import load_extension
from featup.kernels._reference import adaptive_conv_reference
from featup.kernels._validation import check_adaptive_conv_phases

# The public API (tests/test_compile.py::test_public_api). adaptive_conv_phases, adaptive_conv_filter_grad,
# adaptive_conv_phases_reference and has_adaptive_conv_phases are importable by name: CPU helpers for
# featup-core's JBU, with fallbacks elsewhere; so are jbu_stage_kernel and has_jbu_stage_kernel, and
# adaptive_conv_phases_lifted, footprint_sums and has_adaptive_conv_phases_lifted.
__all__ = ["adaptive_conv", "adaptive_conv_reference", "build_info"]

_C = load_extension()
_ops.register()


def adaptive_conv(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Adaptive convolution: every output pixel has its own K x K kernel, shared by all channels.

    ``out[b, c, h, w] = sum_ij filters[b, h, w, i, j] * input[b, c, h + i, w + j]``

    Differentiable in both arguments (and twice). CPU and CUDA; float32 and float64, half and bfloat16 with
    float32 accumulation. Inside ``torch.autocast`` both arguments are cast to the autocast dtype. Any strides
    are accepted.

    Args:
        input: the already padded input.
        filters: one K x K kernel per output pixel.

    Returns:
        The filtered output, contiguous, in the dtype of the arguments.

    Raises:
        ValueError: wrong rank, empty tensor, non-square kernels, batch mismatch, input spatial size not equal
            to output size + K - 1, non-floating dtype, dtype or device mismatch.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, H, W, K, K)
        - output: (B, C, H, W)
    """
    return torch.ops.featup.adaptive_conv(input, filters)


def has_adaptive_conv_phases(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`adaptive_conv_phases` runs compiled on ``device`` (this build has it, and the device is
    the CPU; elsewhere it runs one :func:`adaptive_conv` per phase)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.featup, "adaptive_conv_phases")


def adaptive_conv_phases_reference(
    input: torch.Tensor, filters: torch.Tensor, out_padding: Sequence[int] = (0, 0, 0, 0)
) -> torch.Tensor:
    """:func:`adaptive_conv_phases` as one :func:`adaptive_conv` per phase, interleaved (any device)."""
    b, c, h, w, _, py, px = check_adaptive_conv_phases(input, filters, list(out_padding))
    left, right, top, bottom = (int(v) for v in out_padding)
    out = None
    for p in range(py):
        for q in range(px):
            res = adaptive_conv(input, filters[:, p, q])
            if out is None:
                out = res.new_zeros(b, c, top + py * h + bottom, left + px * w + right)
                inner = out[..., top : top + py * h, left : left + px * w]
            inner[..., p::py, q::px] = res
    assert out is not None
    return out


def adaptive_conv_phases(
    input: torch.Tensor, filters: torch.Tensor, out_padding: Sequence[int] = (0, 0, 0, 0)
) -> torch.Tensor:
    """Several adaptive convolutions of one input, interleaved as the output phases of a resampling.

    ``out[b, c, top + h * Py + p, left + w * Px + q] = adaptive_conv(input, filters[:, p, q])[b, c, h, w]``,
    with zero margins ``out_padding = [left, right, top, bottom]``. The JBU's 2x stages are four such phases
    on one low-res source: computed in one pass, each output row is written once instead of interleaving
    separate outputs afterwards (a full extra pass over the output). Differentiable in ``input`` and
    ``filters`` (twice). Compiled on the CPU; on other devices, or with a build that predates it, it runs
    :func:`adaptive_conv_phases_reference` (same values).

    Raises:
        ValueError: the checks of :func:`adaptive_conv`, filters not 7-D, or a negative or malformed padding.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, Py, Px, H, W, K, K)
        - output: (B, C, top + Py * H + bottom, left + Px * W + right)
    """
    pad = [int(v) for v in out_padding]
    if has_adaptive_conv_phases(input.device) and not torch.is_autocast_enabled("cpu"):
        return torch.ops.featup.adaptive_conv_phases(input, filters, pad)
    return adaptive_conv_phases_reference(input, filters, pad)


def has_adaptive_conv_phases_pooled(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`adaptive_conv_phases_pooled` runs compiled on ``device`` (this build has it, and the
    device is the CPU; elsewhere it pools the output of :func:`adaptive_conv_phases` afterwards)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.featup, "adaptive_conv_phases_pooled")


def adaptive_conv_phases_pooled(
    input: torch.Tensor, filters: torch.Tensor, out_padding: Sequence[int], cell_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adaptive_conv_phases` and, for every row of its inner (unpadded) region, the sums over
    consecutive runs of ``cell_w`` columns, computed as each row is written (no second pass over the output:
    the JBU's back-projection pools its last stage's output onto the low-res grid).

    ``sums[b, c, y, x] = out[b, c, top + y, left + x * cell_w : left + (x + 1) * cell_w].sum()``. Not
    differentiable (the JBU's inference path). Compiled on the CPU; elsewhere (or with a build that predates
    it) the sums are taken from the output afterwards (same values to float rounding).

    Raises:
        ValueError: the checks of :func:`adaptive_conv_phases`, or ``cell_w`` not dividing ``Px * W``.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, Py, Px, H, W, K, K)
        - output: (B, C, top + Py * H + bottom, left + Px * W + right) and (B, C, Py * H, Px * W / cell_w)
    """
    pad = [int(v) for v in out_padding]
    _, _, h, w, _, py, px = check_adaptive_conv_phases(input, filters, pad)
    cell_w = int(cell_w)
    if cell_w < 1 or (px * w) % cell_w:
        raise ValueError(
            f"adaptive_conv_phases_pooled: expected cell_w > 0 dividing the output width {px * w}, got {cell_w}"
        )
    if has_adaptive_conv_phases_pooled(input.device) and not torch.is_autocast_enabled("cpu"):
        return torch.ops.featup.adaptive_conv_phases_pooled(input, filters, pad, cell_w)
    out = adaptive_conv_phases(input, filters, pad)
    left, _, top, _ = pad
    inner = out[..., top : top + py * h, left : left + px * w]
    return out, inner.unflatten(-1, (px * w // cell_w, cell_w)).sum(-1)


def has_adaptive_conv_phases_lifted(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`adaptive_conv_phases_lifted` and :func:`footprint_sums` run compiled on ``device`` (this
    build has them, and the device is the CPU; elsewhere they run as torch ops)."""
    return (
        torch.device(device).type == "cpu"
        and hasattr(torch.ops.featup, "adaptive_conv_phases_lifted")
        and hasattr(torch.ops.featup, "footprint_sums")
    )


def _check_row_lift(
    b: int,
    c: int,
    out_h: int,
    out_w: int,
    rows: torch.Tensor,
    row_start: torch.Tensor,
    row_weights: torch.Tensor,
) -> None:
    name = "adaptive_conv_phases_lifted"
    if rows.dim() != 4 or tuple(rows.shape[:2]) != (b, c) or rows.shape[2] < 1 or rows.shape[3] != out_w:
        raise ValueError(
            f"{name}: expected rows (B, C, n, {out_w}) with B={b}, C={c}, got {tuple(rows.shape)}"
        )
    if row_weights.dim() != 2 or row_weights.shape[0] != out_h or row_weights.shape[1] < 1:
        raise ValueError(f"{name}: expected row_weights ({out_h}, taps), got {tuple(row_weights.shape)}")
    if row_start.dim() != 1 or row_start.shape[0] != out_h or row_start.dtype != torch.int64:
        raise ValueError(
            f"{name}: expected row_start ({out_h},) int64, got {tuple(row_start.shape)} {row_start.dtype}"
        )
    taps, n = row_weights.shape[1], rows.shape[2]
    if bool((row_start < 0).any()) or bool((row_start + taps > n).any()):
        raise ValueError(
            f"{name}: expected 0 <= row_start[y] and row_start[y] + taps <= n = {n} (taps = {taps})"
        )


def adaptive_conv_phases_lifted(
    input: torch.Tensor,
    filters: torch.Tensor,
    rows: torch.Tensor,
    row_start: torch.Tensor,
    row_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`adaptive_conv_phases` (no margins) plus a correction added to each output row as it is written.

    ``out[b, c, y, :] = phases[b, c, y, :] + sum_t row_weights[y, t] * rows[b, c, row_start[y] + t, :]``: the
    JBU's back-projection adds a separable lift ``U_y R U_x^T`` of its low-res residual; with ``rows = R U_x^T``
    and ``U_y``'s few taps per row this writes the last stage's output once instead of adding a full-size
    correction afterwards (a read and a write of the whole output). Not differentiable (the JBU's inference
    path). Compiled on the CPU; elsewhere (or with a build that predates it) the same sum with torch ops.

    Raises:
        ValueError: the checks of :func:`adaptive_conv_phases`, or rows / row_start / row_weights of other
            shapes, dtypes or devices, or a row_start whose taps leave ``rows``.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, Py, Px, H, W, K, K)
        - rows: (B, C, n, Px * W); row_start: (Py * H,) int64; row_weights: (Py * H, taps)
        - output: (B, C, Py * H, Px * W)
    """
    b, c, h, w, _, py, px = check_adaptive_conv_phases(input, filters, [0, 0, 0, 0])
    _check_row_lift(b, c, py * h, px * w, rows, row_start, row_weights)
    if has_adaptive_conv_phases_lifted(input.device) and not torch.is_autocast_enabled("cpu"):
        return torch.ops.featup.adaptive_conv_phases_lifted(input, filters, rows, row_start, row_weights)
    out = adaptive_conv_phases(input, filters)
    taps = row_weights.shape[1]
    index = row_start[:, None] + torch.arange(taps, device=row_start.device)  # (Py * H, taps)
    picked = rows[:, :, index]  # (B, C, Py * H, taps, Px * W)
    return out + (picked * row_weights.to(out.dtype)[:, :, None]).sum(-2).to(out.dtype)


def footprint_sums(input: torch.Tensor, weights: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """Weighted sums of overlapping strided windows, one set of weights per window, shared by the channels.

    ``out[b, c, i, j] = sum_{u, v} weights[b, i, j, u, v] * input[b, c, sy * i + u, sx * j + v]``: the JBU's
    last stage's cell means from its input (the cell means are linear in it), so the back-projection's
    correction is known before the output is written. Not differentiable. Compiled on the CPU; elsewhere an
    unfold and a batched product (same values to float rounding).

    Raises:
        ValueError: wrong ranks, batch / dtype / device mismatch, non-positive strides, or windows that leave
            the input.

    Shape:
        - input: (B, C, Hi, Wi)
        - weights: (B, Ch, Cw, Fy, Fx) with sy * (Ch - 1) + Fy <= Hi and sx * (Cw - 1) + Fx <= Wi
        - output: (B, C, Ch, Cw)
    """
    sy, sx = (int(v) for v in stride)
    if input.dim() != 4 or weights.dim() != 5 or input.numel() == 0 or weights.numel() == 0:
        raise ValueError(
            f"footprint_sums: expected input (B,C,Hi,Wi) and weights (B,Ch,Cw,Fy,Fx), non-empty, got "
            f"{tuple(input.shape)} and {tuple(weights.shape)}"
        )
    b, c, hi, wi = input.shape
    _, ch, cw, fy, fx = weights.shape
    if weights.shape[0] != b:
        raise ValueError(
            f"footprint_sums: batch mismatch, input has B={b} but weights has B={weights.shape[0]}"
        )
    if sy < 1 or sx < 1 or sy * (ch - 1) + fy > hi or sx * (cw - 1) + fx > wi:
        raise ValueError(
            f"footprint_sums: expected strides > 0 with stride * (cells - 1) + footprint <= input size, got "
            f"strides {(sy, sx)}, weights {tuple(weights.shape)}, input {tuple(input.shape)}"
        )
    if not input.is_floating_point() or input.dtype != weights.dtype:
        raise ValueError(
            f"footprint_sums: expected floating-point input and weights of one dtype, got {input.dtype} and "
            f"{weights.dtype}"
        )
    if input.device != weights.device:
        raise ValueError(
            f"footprint_sums: device mismatch, input is on {input.device} but weights is on {weights.device}"
        )
    if has_adaptive_conv_phases_lifted(input.device) and not torch.is_autocast_enabled("cpu"):
        return torch.ops.featup.footprint_sums(input, weights, sy, sx)
    windows = input.unfold(2, fy, sy)[:, :, :ch].unfold(3, fx, sx)[:, :, :, :cw]  # (B, C, Ch, Cw, Fy, Fx)
    return torch.einsum("bcijuv,bijuv->bcij", windows, weights)


def adaptive_conv_filter_grad(grad_out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """The filter gradient of :func:`adaptive_conv` alone (its input gradient is not computed).

    ``out[b, h, w, i, j] = sum_c grad_out[b, c, h, w] * input[b, c, h + i, w + j]``: neighbourhood inner
    products between two maps, as the JBU's range kernel needs them, in one pass and half the work of
    ``adaptive_conv_backward``. Differentiable in both arguments. Compiled on the CPU; elsewhere (or with a
    build that predates it) it is ``adaptive_conv_backward``'s second output.

    Shape:
        - grad_out: (B, C, H, W)
        - input: (B, C, H + K - 1, W + K - 1)
        - output: (B, H, W, K, K)
    """
    if input.device.type == "cpu" and hasattr(torch.ops.featup, "adaptive_conv_filter_grad"):
        if not torch.is_autocast_enabled("cpu"):
            return torch.ops.featup.adaptive_conv_filter_grad(grad_out, input)
    b, _, h, w = grad_out.shape
    k = input.shape[2] - h + 1
    if k < 1 or input.shape[3] - w + 1 != k:
        raise ValueError(
            "adaptive_conv_filter_grad: expected input (B,C,H+K-1,W+K-1) for one K >= 1, got grad_out "
            f"{list(grad_out.shape)} and input {list(input.shape)}"
        )
    return torch.ops.featup.adaptive_conv_backward(grad_out, input, input.new_zeros(b, h, w, k, k))[1]


def has_jbu_stage_kernel(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`jbu_stage_kernel` runs compiled on ``device`` (this build has it and the device is the
    CPU); elsewhere featup-core computes the kernels with torch ops."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.featup, "jbu_stage_kernel")


def jbu_stage_kernel(
    keys: torch.Tensor,
    log_spatial: torch.Tensor,
    temp: float,
    *,
    rgb: torch.Tensor | None = None,
    classic_log_spatial: torch.Tensor | None = None,
    classic_scale: float = 0.0,
    gate: float | None = None,
    guidance: torch.Tensor | None = None,
    w1k: torch.Tensor | None = None,
    w1g: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """One JBU stage's per-pixel K x K kernels (featup-core's default layout) in one pass, pixel-major.

    For pixel p and tap t (neighbour q): ``n = softmax_t(-temp |keys_p - keys_q|^2 + log_spatial)``; with
    ``gate`` a base kernel ``c`` (Kopf's ``exp(classic_scale |rgb_p - rgb_q|^2 + classic_log_spatial)``
    normalised, or the centre tap without ``rgb``); with the correction weights ``d = 0.05 (tanh(w2
    gelu(w1k n + w1g g + b1) + b2) + mirror(...))`` minus its tap mean, the second term the same MLP on the
    left-right mirrored taps; ``out = d + (1 - gate) c + gate n`` (without a gate ``n + d``). One pass over
    tiles of pixels instead of the many full-size tensors the torch ops make. Inference only (no autograd):
    CPU, float32 / float64; exp, erf and tanh are evaluated as torch's vectorised kernels do (polynomials),
    so results equal the torch ops' to float rounding.

    Raises:
        ValueError: a shape, dtype or device that does not fit (naming the argument), or an incomplete set
            of correction weights.
        RuntimeError: a build without the op (see :func:`has_jbu_stage_kernel`).

    Shape:
        - keys: (B, D, H + 2r, W + 2r), already padded (K = 2r + 1)
        - log_spatial, classic_log_spatial, b2: (K*K,)
        - rgb: (B, 3, H + 2r, W + 2r), padded; guidance: (B, G, H, W)
        - w1k: (Hd, K*K); w1g: (Hd, G); b1: (Hd,); w2: (K*K, Hd)
        - output: (B, H, W, K*K)
    """
    if not hasattr(torch.ops.featup, "jbu_stage_kernel"):
        raise RuntimeError("this featup-kernels build has no jbu_stage_kernel op; rebuild featup-kernels")
    return torch.ops.featup.jbu_stage_kernel(
        keys, rgb, guidance, log_spatial, classic_log_spatial, w1k, w1g, b1, w2, b2,
        float(temp), float(classic_scale), None if gate is None else float(gate),
    )  # fmt: skip


def has_jbu_stage_filters(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`jbu_stage_filters` runs compiled on ``device`` (this build has it, on the CPU)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.featup, "jbu_stage_filters")


def jbu_stage_filters(
    keys: torch.Tensor,
    log_spatial: torch.Tensor,
    temp: float,
    *,
    resize_rows: torch.Tensor,
    resize_cols: torch.Tensor,
    phases: tuple[int, int],
    rgb: torch.Tensor | None = None,
    classic_log_spatial: torch.Tensor | None = None,
    classic_scale: float = 0.0,
    gate: float | None = None,
    guidance: torch.Tensor | None = None,
    w1k: torch.Tensor | None = None,
    w1g: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`jbu_stage_kernel`'s kernels turned, in the same pass, into the composite filters featup-core's
    fused JBU applies to the stage's low-res source (why: the K x K kernels are never written out, and no
    per-phase products run afterwards).

    Pixel (y, x) with kernel ``k`` (K x K) gets ``F[a, c] = sum_i resize_rows[y, i, a] sum_j k[i, j]
    resize_cols[x, j, c]``, written at ``out[b, y % py, x % px, y // py, x // px]``. Same arguments and
    conditions as :func:`jbu_stage_kernel`, plus the plan.

    Args:
        resize_rows, resize_cols: per output row / column the K x Wd matrix of "resize, pad, take the taps".
        phases: (py, px), dividing the output size.

    Raises:
        ValueError: as :func:`jbu_stage_kernel`; a plan of another shape, phases that do not divide the output.
        RuntimeError: a build without the op (see :func:`has_jbu_stage_filters`).

    Shape:
        - keys etc.: as :func:`jbu_stage_kernel` (output size H x W)
        - resize_rows: (H, K, Wd); resize_cols: (W, K, Wd)
        - output: (B, py, px, H // py, W // px, Wd, Wd)
    """
    if not hasattr(torch.ops.featup, "jbu_stage_filters"):
        raise RuntimeError("this featup-kernels build has no jbu_stage_filters op; rebuild featup-kernels")
    py, px = (int(v) for v in phases)
    return torch.ops.featup.jbu_stage_filters(
        keys, rgb, guidance, log_spatial, classic_log_spatial, w1k, w1g, b1, w2, b2,
        float(temp), float(classic_scale), None if gate is None else float(gate),
        resize_rows, resize_cols, py, px,
    )  # fmt: skip


def build_info() -> dict[str, Any]:
    """Facts of the installed build.

    Returns:
        ``torch_version`` built against, ``cxx11_abi``, ``cuda`` (bool: CUDA kernels compiled in),
        ``cuda_version`` and ``cuda_architectures`` (None without CUDA), ``cpu_isa`` (the CPU kernels in use:
        ``"avx2"`` or ``"default"``), and ``running_torch_version``.
    """
    info = dict(_C.build_info())
    info["running_torch_version"] = torch.__version__
    return info
