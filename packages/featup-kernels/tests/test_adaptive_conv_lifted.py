"""featup.kernels.adaptive_conv_phases_lifted (the phases plus a per-row correction added as each output row is
written) and footprint_sums (weighted sums of overlapping strided windows): the JBU's back-projection fused
into its last stage.

Checked against their definitions written with torch ops, on both CPU kernel builds, float64 and float32;
the fallbacks, thread-count independence, reduced precision, opcheck and the argument checks.
"""

from __future__ import annotations

import pytest
import torch

import featup.kernels as kernels
from featup.kernels import (
    adaptive_conv_phases_lifted,
    adaptive_conv_phases_reference,
    footprint_sums,
    has_adaptive_conv_phases_lifted,
)

# (B, C, H, W, K, Py, Px, n, taps)
LIFT_CASES = [
    (1, 5, 6, 7, 3, 2, 2, 4, 4),  # bicubic-like: 4 taps
    (2, 19, 9, 5, 7, 2, 2, 3, 2),  # batch 2, the JBU's K = 7, bilinear-like
    (1, 3, 5, 6, 3, 2, 1, 6, 6),  # rows only; 6 taps (a pass of 4, then 2)
    (1, 9, 3, 2, 1, 1, 2, 1, 1),  # K = 1, one tap, rows narrower than a vector
    (1, 17, 13, 11, 5, 2, 2, 5, 3),
]


def _lift_inputs(case, dtype, seed=0):
    b, c, h, w, k, py, px, n, taps = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64).to(dtype)
    f = torch.randn(b, py, px, h, w, k, k, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.randn(b, c, n, px * w, generator=gen, dtype=torch.float64).to(dtype)
    start = torch.randint(0, n - taps + 1, (py * h,), generator=gen)
    weights = torch.randn(py * h, taps, generator=gen, dtype=torch.float64).to(dtype)
    return x, f, rows, start, weights


def _lift_reference(x, f, rows, start, weights):
    out = adaptive_conv_phases_reference(x.double(), f.double())
    for y in range(out.shape[2]):
        for t in range(weights.shape[1]):
            out[:, :, y] += weights[y, t].double() * rows[:, :, start[y] + t].double()
    return out


def test_this_build_has_the_compiled_ops():
    assert has_adaptive_conv_phases_lifted("cpu") and not has_adaptive_conv_phases_lifted("meta")
    assert hasattr(torch.ops.featup, "adaptive_conv_phases_lifted") and hasattr(
        torch.ops.featup, "footprint_sums"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LIFT_CASES)
def test_lifted_is_the_phases_plus_the_weighted_rows(cpu_isa, case, dtype):
    x, f, rows, start, weights = _lift_inputs(case, dtype)
    out = torch.ops.featup.adaptive_conv_phases_lifted(x, f, rows, start, weights)
    ref = _lift_reference(x, f, rows, start, weights)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * max(1.0, float(ref.abs().max())))
    fallback = kernels.adaptive_conv_phases_lifted  # the wrapper takes the op
    assert torch.equal(fallback(x, f, rows, start, weights), out)


def test_a_streamed_output_equals_the_cached_one_bit_for_bit(cpu_isa):
    # outputs of 16 MB and more are written with streaming stores into huge-page-advised memory; channels are
    # independent, so two halves of the channels (each under 16 MB: ordinary stores) must give the same bits
    x, f, rows, start, weights = _lift_inputs((1, 96, 112, 112, 7, 2, 2, 14, 4), torch.float32)
    out = torch.ops.featup.adaptive_conv_phases_lifted(x, f, rows, start, weights)
    assert out.numel() * out.element_size() >= 16 << 20
    halves = [
        torch.ops.featup.adaptive_conv_phases_lifted(x[:, s], f, rows[:, s], start, weights)
        for s in (slice(0, 48), slice(48, 96))
    ]
    assert halves[0].numel() * halves[0].element_size() < 16 << 20
    assert torch.equal(out, torch.cat(halves, 1))
    ref = _lift_reference(x[:, :4], f, rows[:, :4], start, weights)
    torch.testing.assert_close(out[:, :4].double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


def test_lifted_falls_back_without_the_compiled_op(monkeypatch):
    x, f, rows, start, weights = _lift_inputs(LIFT_CASES[1], torch.float64)
    out = adaptive_conv_phases_lifted(x, f, rows, start, weights)
    monkeypatch.setattr(kernels, "has_adaptive_conv_phases_lifted", lambda device="cpu": False)
    ref = kernels.adaptive_conv_phases_lifted(x, f, rows, start, weights)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast takes the torch ops too
        kernels.adaptive_conv_phases_lifted(x, f, rows, start, weights)


def test_lifted_is_bitwise_the_same_for_any_thread_count():
    x, f, rows, start, weights = _lift_inputs(LIFT_CASES[4], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.featup.adaptive_conv_phases_lifted(x, f, rows, start, weights)
        sums_one = torch.ops.featup.footprint_sums(x, f[:, 0, 0, :3, :2, :3, :3].contiguous(), 3, 2)
        torch.set_num_threads(3)
        three = torch.ops.featup.adaptive_conv_phases_lifted(x, f, rows, start, weights)
        sums_three = torch.ops.featup.footprint_sums(x, f[:, 0, 0, :3, :2, :3, :3].contiguous(), 3, 2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three) and torch.equal(sums_one, sums_three)


def test_lifted_reduced_precision_opcheck_and_errors():
    x, f, rows, start, weights = _lift_inputs(LIFT_CASES[0], torch.float32)
    out = torch.ops.featup.adaptive_conv_phases_lifted(x.bfloat16(), f.bfloat16(), rows.bfloat16(), start,
                                                       weights.bfloat16())  # fmt: skip
    assert out.dtype == torch.bfloat16
    ref = _lift_reference(x.bfloat16(), f.bfloat16(), rows.bfloat16(), start, weights.bfloat16())
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=0.2)
    x64, f64, r64, s64, w64 = _lift_inputs(LIFT_CASES[2], torch.float64)
    torch.library.opcheck(torch.ops.featup.adaptive_conv_phases_lifted.default, (x64, f64, r64, s64, w64))
    for op in (adaptive_conv_phases_lifted, torch.ops.featup.adaptive_conv_phases_lifted):
        with pytest.raises(ValueError, match="row_start"):
            op(x, f, rows, start + rows.shape[2], weights)  # taps leave rows
        with pytest.raises(ValueError, match="row_start"):
            op(x, f, rows, start.int(), weights)
        with pytest.raises(ValueError, match="expected rows"):
            op(x, f, rows[..., 1:], start, weights)
        with pytest.raises(ValueError, match="row_weights"):
            op(x, f, rows, start, weights[1:])
        with pytest.raises(ValueError, match="expected input spatial size"):
            op(x[..., 1:, :], f, rows, start, weights)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.featup.adaptive_conv_phases_lifted(x, f, rows.double(), start, weights)


# footprint_sums: out[b, c, i, j] = sum_uv weights[b, i, j, u, v] * input[b, c, sy i + u, sx j + v]

# (B, C, Hi, Wi, Ch, Cw, Fy, Fx, sy, sx)
SUM_CASES = [
    (1, 6, 118, 118, 14, 14, 14, 14, 8, 8),  # the JBU's 16x last stage: 14x14 cells, footprints of 8 + 6
    (2, 5, 20, 23, 3, 4, 8, 6, 5, 5),  # windows that do not reach the input's end
    (1, 3, 17, 19, 4, 3, 5, 11, 4, 3),  # a footprint 3.7 times the stride: 4 column blocks
    (1, 4, 6, 9, 2, 9, 2, 1, 2, 1),  # one-column footprints, no overlap
]


def _sum_inputs(case, dtype, seed=1):
    b, c, hi, wi, ch, cw, fy, fx = case[:8]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, hi, wi, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(b, ch, cw, fy, fx, generator=gen, dtype=torch.float64).to(dtype)
    return x, w


def _sum_reference(x, w, sy, sx):
    ch, cw, fy, fx = w.shape[1:]
    out = x.new_zeros(x.shape[0], x.shape[1], ch, cw, dtype=torch.float64)
    for i in range(ch):
        for j in range(cw):
            window = x[:, :, sy * i : sy * i + fy, sx * j : sx * j + fx].double()
            out[:, :, i, j] = (window * w[:, None, i, j].double()).sum((-2, -1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SUM_CASES)
def test_footprint_sums_are_the_weighted_window_sums(cpu_isa, case, dtype):
    x, w = _sum_inputs(case, dtype)
    sy, sx = case[-2:]
    out = torch.ops.featup.footprint_sums(x, w, sy, sx)
    ref = _sum_reference(x, w, sy, sx)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * max(1.0, float(ref.abs().max())))


def test_footprint_sums_fallback_reduced_precision_opcheck_and_errors(monkeypatch):
    x, w = _sum_inputs(SUM_CASES[2], torch.float64)
    out = footprint_sums(x, w, (4, 3))
    half = torch.ops.featup.footprint_sums(x.bfloat16(), w.bfloat16(), 4, 3)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), out, rtol=3e-2, atol=0.3)
    torch.library.opcheck(torch.ops.featup.footprint_sums.default, (x, w, 4, 3))
    with pytest.raises(ValueError, match="stride"):
        footprint_sums(x, w, (5, 3))  # the last window leaves the input
    with pytest.raises(ValueError, match="stride"):
        torch.ops.featup.footprint_sums(x, w, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        torch.ops.featup.footprint_sums(x, w, 0, 3)
    with pytest.raises(ValueError, match="batch mismatch"):
        footprint_sums(x, torch.cat([w, w]), (4, 3))
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.featup.footprint_sums(x, w.float(), 4, 3)
    with pytest.raises(ValueError, match="expected input"):
        footprint_sums(x[0], w, (4, 3))
    monkeypatch.setattr(kernels, "has_adaptive_conv_phases_lifted", lambda device="cpu": False)
    torch.testing.assert_close(kernels.footprint_sums(x, w, (4, 3)), out, rtol=0, atol=1e-12)
