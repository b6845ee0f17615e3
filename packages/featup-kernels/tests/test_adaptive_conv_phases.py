"""featup.kernels.adaptive_conv_phases (the output phases of a resampling in one pass),
adaptive_conv_phases_pooled (the same plus the output rows' cell sums) and adaptive_conv_filter_grad (the
filter gradient alone).

Checked against its definition (one ``adaptive_conv`` per phase, interleaved into a zero-margined output),
bit for bit, on both CPU kernel builds; its gradients (twice) and argument checks.
"""

from __future__ import annotations

import pytest
import torch

from featup.kernels import (
    adaptive_conv,
    adaptive_conv_filter_grad,
    adaptive_conv_phases,
    adaptive_conv_phases_pooled,
    adaptive_conv_phases_reference,
    has_adaptive_conv_phases,
    has_adaptive_conv_phases_pooled,
)

# (B, C, H, W, K, Py, Px, out_padding [left, right, top, bottom])
CASES = [
    (1, 5, 6, 7, 3, 2, 2, [0, 0, 0, 0]),
    (2, 19, 9, 5, 7, 2, 2, [3, 3, 3, 3]),  # the JBU's 2x stage with the next stage's margins
    (1, 8, 4, 4, 5, 1, 1, [1, 2, 0, 3]),
    (1, 3, 5, 6, 3, 2, 1, [2, 0, 1, 0]),  # rows only; no bottom margin
    (1, 17, 13, 11, 7, 2, 2, [0, 4, 2, 0]),
    (1, 9, 3, 2, 1, 3, 2, [1, 1, 1, 1]),  # K = 1, three row phases, rows narrower than a vector
]


def _inputs(case, dtype, seed=0):
    b, c, h, w, k, py, px, _ = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64).to(dtype)
    f = torch.randn(b, py, px, h, w, k, k, generator=gen, dtype=torch.float64).to(dtype)
    return x, f


def test_this_build_has_the_compiled_op():
    assert has_adaptive_conv_phases("cpu")
    assert hasattr(torch.ops.featup, "adaptive_conv_phases")
    assert not has_adaptive_conv_phases("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_equals_one_adaptive_conv_per_phase_bit_for_bit(cpu_isa, case, dtype):
    x, f = _inputs(case, dtype)
    pad = case[-1]
    out = torch.ops.featup.adaptive_conv_phases(x, f, pad)
    assert torch.equal(out, adaptive_conv_phases_reference(x, f, pad))
    left, right, top, bottom = pad
    py, px, h, w = f.shape[1:5]
    assert out.shape == (x.shape[0], x.shape[1], top + py * h + bottom, left + px * w + right)
    inner = out[..., top : top + py * h, left : left + px * w]
    assert torch.equal(inner[..., 1 % py :: py, 0::px], adaptive_conv(x, f[:, 1 % py, 0]))
    margin = torch.ones_like(out, dtype=torch.bool)
    margin[..., top : top + py * h, left : left + px * w] = False
    assert out[margin].eq(0).all()  # the margins are zeroed, not left uninitialised


def test_reduced_precision_accumulates_in_float():
    x, f = _inputs(CASES[1], torch.float32)
    pad = CASES[1][-1]
    out = torch.ops.featup.adaptive_conv_phases(x.bfloat16(), f.bfloat16(), pad)
    assert out.dtype == torch.bfloat16
    ref = adaptive_conv_phases_reference(x.bfloat16().float(), f.bfloat16().float(), pad)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_gradients_twice():
    x, f = _inputs((1, 3, 4, 5, 3, 2, 2, None), torch.float64, seed=1)
    x.requires_grad_(True)
    f.requires_grad_(True)

    def fn(x, f):
        return adaptive_conv_phases(x, f, [1, 2, 0, 1])

    assert torch.autograd.gradcheck(fn, (x, f))
    assert torch.autograd.gradgradcheck(fn, (x, f))


def test_opcheck_schema_fake_and_autograd():
    x, f = _inputs(CASES[0], torch.float64)
    torch.library.opcheck(torch.ops.featup.adaptive_conv_phases.default, (x, f, [1, 0, 2, 1]))


def test_bad_arguments_say_what_was_expected():
    x, f = _inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match=r"expected filters \(B,Py,Px,H,W,K,K\)"):
        adaptive_conv_phases(x, f[:, 0])
    with pytest.raises(ValueError, match="out_padding"):
        adaptive_conv_phases(x, f, [0, 0, -1, 0])
    with pytest.raises(ValueError, match="out_padding"):
        torch.ops.featup.adaptive_conv_phases(x, f, [0, 0, 0])
    with pytest.raises(ValueError, match="expected input spatial size"):
        adaptive_conv_phases(x[..., 1:, :], f)
    with pytest.raises(ValueError, match="dtype mismatch"):
        adaptive_conv_phases(x, f.double())


# adaptive_conv_phases_pooled: the output and its rows' sums over runs of cell_w columns


def _row_cell_sums(out, pad, py, h, px, w, cell_w):
    left, _, top, _ = pad
    inner = out[..., top : top + py * h, left : left + px * w]
    return inner.unflatten(-1, (px * w // cell_w, cell_w)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("case", "cell_w"), [(CASES[0], 7), (CASES[1], 5), (CASES[3], 3), (CASES[4], 11)])
def test_pooled_output_is_the_phases_output_and_its_cell_sums(cpu_isa, case, cell_w, dtype):
    assert has_adaptive_conv_phases_pooled("cpu") and not has_adaptive_conv_phases_pooled("meta")
    x, f = _inputs(case, dtype)
    pad = case[-1]
    py, px, h, w = f.shape[1:5]
    out, sums = torch.ops.featup.adaptive_conv_phases_pooled(x, f, pad, cell_w)
    assert torch.equal(out, adaptive_conv_phases_reference(x, f, pad))  # the same op: bit for bit
    ref = _row_cell_sums(out.double(), pad, py, h, px, w, cell_w)
    assert sums.dtype == dtype and sums.shape == ref.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(sums.double(), ref, rtol=0, atol=tol * max(1.0, float(ref.abs().max())))


def test_pooled_falls_back_without_the_compiled_op(monkeypatch):
    import featup.kernels as kernels

    x, f = _inputs(CASES[1], torch.float64)
    pad = CASES[1][-1]
    out, sums = adaptive_conv_phases_pooled(x, f, pad, 5)
    monkeypatch.setattr(kernels, "has_adaptive_conv_phases_pooled", lambda device="cpu": False)
    out_ref, sums_ref = kernels.adaptive_conv_phases_pooled(x, f, pad, 5)
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(sums, sums_ref, rtol=0, atol=1e-12)


def test_pooled_reduced_precision_opcheck_and_errors():
    x, f = _inputs(CASES[1], torch.float32)
    pad = CASES[1][-1]
    out, sums = torch.ops.featup.adaptive_conv_phases_pooled(x.bfloat16(), f.bfloat16(), pad, 10)
    assert out.dtype == sums.dtype == torch.bfloat16
    ref = adaptive_conv_phases_reference(x.bfloat16().float(), f.bfloat16().float(), pad)
    torch.testing.assert_close(sums.float(), _row_cell_sums(ref, pad, 2, 9, 2, 5, 10), rtol=2e-2, atol=5e-2)
    x64, f64 = _inputs(CASES[0], torch.float64)
    torch.library.opcheck(torch.ops.featup.adaptive_conv_phases_pooled.default, (x64, f64, [1, 0, 2, 1], 2))
    with pytest.raises(ValueError, match="cell_w"):
        adaptive_conv_phases_pooled(x, f, pad, 3)  # 10 output columns
    with pytest.raises(ValueError, match="cell_w"):
        torch.ops.featup.adaptive_conv_phases_pooled(x, f, pad, 0)
    with pytest.raises(ValueError, match="out_padding"):
        adaptive_conv_phases_pooled(x, f, [0, 0, -1, 0], 5)


# adaptive_conv_filter_grad: the filter gradient alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 34, 9, 11, 7), (2, 3, 4, 3, 5), (1, 1, 2, 2, 1)])
def test_filter_grad_equals_the_backward_ops_filter_gradient(cpu_isa, shape, dtype):
    b, c, h, w, k = shape
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64).to(dtype)
    assert hasattr(torch.ops.featup, "adaptive_conv_filter_grad")
    ours = adaptive_conv_filter_grad(g, x)
    full = torch.ops.featup.adaptive_conv_backward(g, x, torch.zeros(b, h, w, k, k, dtype=dtype))[1]
    assert torch.equal(ours, full)


def test_filter_grad_gradients_and_errors():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(adaptive_conv_filter_grad, (g, x))
    assert torch.autograd.gradgradcheck(adaptive_conv_filter_grad, (g, x))
    torch.library.opcheck(torch.ops.featup.adaptive_conv_filter_grad.default, (g.detach(), x.detach()))
    with pytest.raises(ValueError, match="one K >= 1"):
        adaptive_conv_filter_grad(g, x[..., :-1])
    with pytest.raises(ValueError, match="dtype"):
        adaptive_conv_filter_grad(g, x.float())
