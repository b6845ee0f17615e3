"""featup.kernels.adaptive_conv against its definition and the pure-PyTorch oracle.

Every numerical test runs on both CPU kernel builds (``cpu_isa`` fixture: AVX2 and the baseline), and the
shapes include rows narrower than one vector, which run the scalar arithmetic shared with the CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from featup.kernels import adaptive_conv, adaptive_conv_reference

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def make_inputs(
    b: int, c: int, h: int, w: int, k: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``input (B,C,H+K-1,W+K-1)`` and ``filters (B,H,W,K,K)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64).to(dtype)
    f = torch.randn(b, h, w, k, k, generator=gen, dtype=torch.float64).to(dtype)
    return x, f


def naive_loops(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The definition as an element loop in float64: out[b,c,h,w] = sum_ij f[b,h,w,i,j] * x[b,c,h+i,w+j]."""
    b, c = x.shape[:2]
    _, h, w, k, _ = f.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for bb in range(b):
        for cc in range(c):
            for hh in range(h):
                for ww in range(w):
                    out[bb, cc, hh, ww] = sum(
                        float(f[bb, hh, ww, i, j]) * float(x[bb, cc, hh + i, ww + j])
                        for i in range(k)
                        for j in range(k)
                    )
    return out


# ---- the oracle itself -------------------------------------------------------------------------------------


def test_reference_matches_definition() -> None:
    x, f = make_inputs(2, 3, 4, 5, 3)
    torch.testing.assert_close(adaptive_conv_reference(x, f), naive_loops(x, f))


def test_smoke(cpu_isa: str) -> None:
    x, f = make_inputs(2, 3, 5, 11, 3, dtype=torch.float32)
    out = adaptive_conv(x, f)
    assert out.shape == (2, 3, 5, 11) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), naive_loops(x, f), rtol=1e-5, atol=1e-5)


def test_identity_and_shift_filters(cpu_isa: str) -> None:
    """A one-hot kernel at tap (i, j) selects the input shifted by (i, j); uniform kernels are box filters."""
    x, _ = make_inputs(1, 4, 9, 13, 3)
    f = torch.zeros(1, 9, 13, 3, 3, dtype=torch.float64)
    f[..., 2, 1] = 1.0
    torch.testing.assert_close(adaptive_conv(x, f), x[:, :, 2:11, 1:14])
    box = torch.full((1, 9, 13, 3, 3), 1.0 / 9, dtype=torch.float64)
    torch.testing.assert_close(adaptive_conv(x, box), torch.nn.functional.avg_pool2d(x, 3, stride=1))


# ---- properties against the oracle -------------------------------------------------------------------------

shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 70),  # C
    st.integers(1, 40),  # H
    st.integers(1, 40),  # W
    st.integers(1, 9),  # K
)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
@example(shape=(1, 1, 1, 1, 1), seed=0)
@example(shape=(1, 5, 3, 7, 9), seed=1)  # narrower than a float vector: the shared scalar path
@example(shape=(2, 9, 2, 8, 2), seed=2)  # exactly one vector
@example(shape=(1, 6, 5, 9, 4), seed=3)  # one vector plus an overlapping one
@example(shape=(3, 70, 3, 40, 5), seed=4)  # channel blocks plus a remainder
def test_forward_and_grads_match_reference(cpu_isa: str, shape: tuple[int, ...], seed: int) -> None:
    b, c, h, w, k = shape
    x, f = make_inputs(b, c, h, w, k, seed=seed)
    x.requires_grad_(True)
    f.requires_grad_(True)
    out = adaptive_conv(x, f)
    ref = adaptive_conv_reference(x, f)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    gx, gf = torch.autograd.grad(out, (x, f), grad)
    rx, rf = torch.autograd.grad(ref, (x, f), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gf, rf, rtol=1e-10, atol=1e-10)


@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(shape=shapes, seed=st.integers(0, 2**16))
@example(shape=(1, 3, 2, 5, 3), seed=0)
def test_float32_matches_reference(cpu_isa: str, shape: tuple[int, ...], seed: int) -> None:
    b, c, h, w, k = shape
    x, f = make_inputs(b, c, h, w, k, seed=seed)
    xs, fs = x.float().requires_grad_(True), f.float().requires_grad_(True)
    out = adaptive_conv(xs, fs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), adaptive_conv_reference(x, f), rtol=1e-4, atol=1e-4 * k)
    gx, gf = torch.autograd.grad(out, (xs, fs), torch.ones_like(out))
    x.requires_grad_(True)
    f.requires_grad_(True)
    rx, rf = torch.autograd.grad(adaptive_conv_reference(x, f).sum(), (x, f))
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-4 * k)
    torch.testing.assert_close(gf.double(), rf, rtol=1e-4, atol=1e-4 * c)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
@pytest.mark.parametrize("w", [5, 8, 13, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_size(cpu_isa: str, k: int, w: int, dtype: torch.dtype) -> None:
    """K <= 9 runs kernels compiled for that K, K = 11 the run-time K path: each with all column cases
    (narrow, one vector, overlapping last vector, several), 7 rows (full row tiles plus a partial one) and
    9 channels (channel blocks plus a remainder)."""
    x, f = make_inputs(2, 9, 7, w, k, seed=k * w)
    xs, fs = x.to(dtype).requires_grad_(True), f.to(dtype).requires_grad_(True)
    out = adaptive_conv(xs, fs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4 * k
    torch.testing.assert_close(out.double(), adaptive_conv_reference(x, f), rtol=tol, atol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gx, gf = torch.autograd.grad(out, (xs, fs), grad.to(dtype))
    x.requires_grad_(True)
    f.requires_grad_(True)
    rx, rf = torch.autograd.grad(adaptive_conv_reference(x, f), (x, f), grad)
    torch.testing.assert_close(gx.double(), rx, rtol=tol, atol=tol)
    torch.testing.assert_close(gf.double(), rf, rtol=tol, atol=tol * 9)


@pytest.mark.parametrize("shape", [(1, 37, 61, 40, 5), (2, 70, 20, 200, 3)])
def test_bands_and_channel_chunks(cpu_isa: str, shape: tuple[int, ...]) -> None:
    """Shapes whose forward splits the rows into several bands of row tiles (wide or tall images) and the
    channels into several chunks, with a partial last band and chunk."""
    x, f = make_inputs(*shape, seed=5)
    torch.testing.assert_close(adaptive_conv(x, f), adaptive_conv_reference(x, f), rtol=1e-10, atol=1e-10)


# ---- gradients ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3), (1, 2, 3, 9, 2), (1, 1, 2, 2, 1)])
def test_gradcheck(cpu_isa: str, shape: tuple[int, ...]) -> None:
    x, f = make_inputs(*shape)
    x.requires_grad_(True)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(adaptive_conv, (x, f))
    assert torch.autograd.gradgradcheck(adaptive_conv, (x, f))


def test_gradient_of_one_argument_only() -> None:
    x, f = make_inputs(1, 2, 3, 4, 3)
    f.requires_grad_(True)
    (gf,) = torch.autograd.grad(adaptive_conv(x, f).sum(), (f,))
    torch.testing.assert_close(gf, torch.autograd.grad(adaptive_conv_reference(x, f).sum(), (f,))[0])
    x.requires_grad_(True)
    f.requires_grad_(False)
    (gx,) = torch.autograd.grad(adaptive_conv(x, f).sum(), (x,))
    torch.testing.assert_close(gx, torch.autograd.grad(adaptive_conv_reference(x, f).sum(), (x,))[0])


@pytest.mark.parametrize("shape", [(2, 9, 7, 19, 5), (1, 96, 40, 40, 3)])
def test_deterministic_across_thread_counts(shape: tuple[int, ...]) -> None:
    """Every output and gradient element is written by exactly one task in a fixed order, however the tasks
    are cut for the thread count (channel chunks differ for 1 and 2 threads): bitwise equal results."""
    x, f = make_inputs(*shape, dtype=torch.float32)
    x.requires_grad_(True)
    f.requires_grad_(True)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = adaptive_conv(x, f)
            results.append((out, *torch.autograd.grad(out, (x, f), torch.ones_like(out))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- layouts -----------------------------------------------------------------------------------------------


def test_noncontiguous(cpu_isa: str) -> None:
    x, f = make_inputs(2, 3, 6, 7, 3)
    x_wide = torch.zeros(2, 6, 8, 18, dtype=torch.float64)
    x_wide[:, ::2, :, ::2] = x
    x_strided = x_wide[:, ::2, :, ::2]  # strided in channels and columns
    f_perm = f.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)  # (B,H,W,K,K) view, W-major memory
    assert not x_strided.is_contiguous() and not f_perm.is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    expected = adaptive_conv_reference(x, f)
    for xi, fi in (
        (x_strided, f),
        (x, f_perm),
        (x_cl, f_perm),
        (x.transpose(2, 3).contiguous().transpose(2, 3), f),
    ):
        torch.testing.assert_close(adaptive_conv(xi, fi), expected)
        xg, fg = xi.detach().requires_grad_(True), fi.detach().requires_grad_(True)
        gx, gf = torch.autograd.grad(adaptive_conv(xg, fg).sum(), (xg, fg))
        xr, fr = x.detach().requires_grad_(True), f.detach().requires_grad_(True)
        rx, rf = torch.autograd.grad(adaptive_conv_reference(xr, fr).sum(), (xr, fr))
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gf, rf)


# ---- reduced precision and autocast ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16(cpu_isa: str, dtype: torch.dtype) -> None:
    x, f = make_inputs(2, 5, 6, 11, 3, dtype=dtype)
    x.requires_grad_(True)
    f.requires_grad_(True)
    out = adaptive_conv(x, f)
    assert out.dtype == dtype
    # The same products summed in float32 and rounded once: equal up to one rounding of the result.
    exact = adaptive_conv_reference(x.double(), f.double())
    torch.testing.assert_close(
        out.double(), exact.to(dtype).double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3
    )
    gx, gf = torch.autograd.grad(out, (x, f), torch.ones_like(out))
    assert gx.dtype == dtype and gf.dtype == dtype
    xd, fd = x.detach().double().requires_grad_(True), f.detach().double().requires_grad_(True)
    rx, rf = torch.autograd.grad(adaptive_conv_reference(xd, fd).sum(), (xd, fd))
    torch.testing.assert_close(gx.double(), rx.to(dtype).double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    torch.testing.assert_close(gf.double(), rf.to(dtype).double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_half_accumulates_in_float(cpu_isa: str) -> None:
    """81 taps of 0.1 on ones: half accumulation would drift by ~0.05, float32 stays within 1/2 ulp."""
    x = torch.ones(1, 2, 11, 12, dtype=torch.float16)
    f = torch.full((1, 3, 4, 9, 9), 0.1, dtype=torch.float16)
    out = adaptive_conv(x, f).double()
    exact = 81 * float(torch.tensor(0.1, dtype=torch.float16))
    half_ulp = 0.5 * 2.0 ** (-10 + 3)  # the result is in [8, 16)
    assert (out - exact).abs().max().item() <= half_ulp


def test_autocast_cpu_bfloat16() -> None:
    """In autocast a bfloat16 activation meets float32 filters: both go to bfloat16, float32 accumulation."""
    x, f = make_inputs(1, 4, 5, 9, 3, dtype=torch.float32)
    x.requires_grad_(True)
    f.requires_grad_(True)
    with pytest.raises(ValueError, match="dtype mismatch"):
        adaptive_conv(x.bfloat16(), f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adaptive_conv(x.bfloat16(), f)
        out32 = adaptive_conv(x, f)  # float32 arguments are cast too
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.bfloat16
    expected = adaptive_conv_reference(x.bfloat16().double(), f.bfloat16().double()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
    torch.testing.assert_close(out32, expected, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
    gx, gf = torch.autograd.grad(out.float().sum(), (x, f))
    assert gx.dtype == torch.float32 and gf.dtype == torch.float32  # gradients flow back through the casts
    xr, fr = x.detach().requires_grad_(True), f.detach().requires_grad_(True)
    rx, rf = torch.autograd.grad(adaptive_conv_reference(xr, fr).sum(), (xr, fr))
    torch.testing.assert_close(gx, rx, rtol=0.02, atol=0.05)
    torch.testing.assert_close(gf, rf, rtol=0.02, atol=0.05)


# ---- bad input ---------------------------------------------------------------------------------------------

Z = torch.zeros
BAD_INPUTS = [
    (Z(3, 8, 8), Z(1, 6, 6, 3, 3), r"expected input \(B,C,H\+K-1,W\+K-1\), got \[3, 8, 8\]"),
    (Z(1, 3, 8, 8), Z(6, 6, 3, 3), r"expected filters \(B,H,W,K,K\), got \[6, 6, 3, 3\]"),
    (Z(2, 3, 8, 8), Z(1, 6, 6, 3, 3), r"batch mismatch, input has B=2 but filters has B=1"),
    (Z(1, 3, 8, 8), Z(1, 6, 6, 3, 5), r"expected square kernels.*got 3 x 5"),
    (Z(1, 3, 8, 9), Z(1, 6, 6, 3, 3), r"expected input spatial size \(H\+K-1, W\+K-1\) = \(8, 8\)"),
    (Z(1, 3, 9, 9), Z(1, 6, 6, 3, 3), r"= \(8, 8\) for filters \[1, 6, 6, 3, 3\], got input \[1, 3, 9, 9\]"),
    (Z(1, 3, 8, 8), Z(1, 6, 6, 3, 3).double(), r"dtype mismatch, input is Float but filters is Double"),
    (Z(1, 3, 8, 8).int(), Z(1, 6, 6, 3, 3).int(), r"expected floating-point tensors"),
    (Z(1, 0, 8, 8), Z(1, 6, 6, 3, 3), r"expected non-empty tensors, got input \[1, 0, 8, 8\]"),
    (Z(0, 3, 8, 8), Z(0, 6, 6, 3, 3), r"expected non-empty tensors"),
    (Z(1, 3, 2, 2), Z(1, 2, 2, 0, 0), r"expected non-empty tensors"),
]  # fmt: skip


@pytest.mark.parametrize(("x", "f", "message"), BAD_INPUTS)
def test_exception(x: torch.Tensor, f: torch.Tensor, message: str) -> None:
    with pytest.raises(
        ValueError, match=message.replace("Float", "(Float|float32)").replace("Double", "(Double|float64)")
    ):
        adaptive_conv(x, f)
    with pytest.raises(ValueError, match=message.replace("Float", "float32").replace("Double", "float64")):
        adaptive_conv_reference(x, f)


def test_exception_device_mismatch() -> None:
    x, f = make_inputs(1, 2, 3, 3, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"device mismatch, input is on cpu but filters is on meta"):
        adaptive_conv(x, f.to("meta"))
    with pytest.raises(ValueError, match=r"device mismatch"):
        adaptive_conv_reference(x, f.to("meta"))


def test_exception_not_a_tensor() -> None:
    _, f = make_inputs(1, 2, 3, 3, 3)
    with pytest.raises(TypeError, match="expected input to be a torch.Tensor, got list"):
        adaptive_conv_reference([1.0], f)


def test_backward_exception() -> None:
    x, f = make_inputs(1, 2, 3, 4, 3)
    with pytest.raises(
        ValueError, match=r"expected grad_out \(B,C,H,W\) = \(1, 2, 3, 4\), got \[1, 2, 4, 3\]"
    ):
        torch.ops.featup.adaptive_conv_backward(torch.zeros(1, 2, 4, 3, dtype=torch.float64), x, f)
    with pytest.raises(ValueError, match=r"dtype mismatch, grad_out is Float but input is Double"):
        torch.ops.featup.adaptive_conv_backward(torch.zeros(1, 2, 3, 4), x, f)
