"""The CUDA kernels' thread bodies, run on the CPU over every thread of a grid, against the reference.

``torch.ops.featup._emulate_cuda_threads_*`` (private testing ops) run the host/device functions of
``csrc/adaptive_conv_threads.h`` that the CUDA kernels run: the grid-stride loop, the flat index -> (b, c, h, w)
or (b, h, w, i, j) decomposition, the pointer offsets and the shared arithmetic. They are compared bitwise with
a PyTorch computation summing in the same order (each product rounded, then added: the emulation is compiled
without FMA contraction), and with ``adaptive_conv_reference`` and its autograd gradients to a tight tolerance.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from featup.kernels import _C, adaptive_conv_reference

ops = torch.ops.featup

# Odd and small shapes: every K the model uses and more, C = 1, 3 and a C beyond any vector/tile width.
KS = [1, 3, 5, 7, 9]
CS = [1, 3, 130]
B, H, W = 3, 5, 7  # H != W


def make(b: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64).to(dtype)
    f = torch.randn(b, h, w, k, k, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return x, f, g


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """at::opmath_type: half and bfloat16 accumulate in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def same_order(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """Forward, grad_input and grad_filters summed in the thread bodies' order, in their accumulation type.

    forward: over taps (i, j) row-major; grad_input: over the taps whose output lies inside, row-major;
    grad_filters: over channels. Every step is ``acc = acc + a * b`` with the product rounded first.
    """
    dtype = x.dtype
    x, f, g = (t.to(acc_dtype(dtype)) for t in (x, f, g))
    b, c, hp, wp = x.shape
    _, h, w, k, _ = f.shape
    out = torch.zeros(b, c, h, w, dtype=x.dtype)
    grad_input = torch.zeros_like(x)
    for i, j in itertools.product(range(k), range(k)):
        out = out + f[:, None, :, :, i, j] * x[:, :, i : i + h, j : j + w]
        window = grad_input[:, :, i : i + h, j : j + w]
        grad_input[:, :, i : i + h, j : j + w] = window + f[:, None, :, :, i, j] * g
    patches = x.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H, W, K, K): patches[..., i, j] = x[b, c, h+i, w+j]
    grad_filters = torch.zeros(b, h, w, k, k, dtype=x.dtype)
    for cc in range(c):
        grad_filters = grad_filters + g[:, cc, :, :, None, None] * patches[:, cc]
    return out.to(dtype), grad_input.to(dtype), grad_filters.to(dtype)


def reference_with_grads(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """adaptive_conv_reference and its autograd gradients, in float64."""
    xd, fd = x.double().requires_grad_(True), f.double().requires_grad_(True)
    out = adaptive_conv_reference(xd, fd)
    gx, gf = torch.autograd.grad(out, (xd, fd), g.double())
    return out.detach(), gx, gf


def emulate(x, f, g, threads: int, blocks: int | None):
    out = ops._emulate_cuda_threads_forward(x, f, threads=threads, blocks=blocks)
    gx, gf = ops._emulate_cuda_threads_backward(g, x, f, threads=threads, blocks=blocks)
    return out, gx, gf


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_thread_bodies_match_reference(k: int, c: int, dtype: torch.dtype) -> None:
    """Every thread of the CUDA launch's own grid: bitwise against the same-order sums, close to the reference."""
    x, f, g = make(B, c, H, W, k, dtype, seed=k * 1000 + c)
    got = emulate(x, f, g, threads=256, blocks=None)
    for name, a, e in zip(("forward", "grad_input", "grad_filters"), got, same_order(x, f, g), strict=True):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert torch.equal(a, e), f"{name}: max diff {(a - e).abs().max().item()} from the same-order sum"
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for name, a, e in zip(
        ("forward", "grad_input", "grad_filters"), got, reference_with_grads(x, f, g), strict=True
    ):
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 7])
def test_thread_bodies_half_accumulate_in_float(dtype: torch.dtype, k: int) -> None:
    """Half and bfloat16 load into float32, sum in float32 and round once: bitwise the same-order float sums."""
    x, f, g = make(B, 130, H, W, k, dtype, seed=k)
    got = emulate(x, f, g, threads=256, blocks=None)
    for name, a, e in zip(("forward", "grad_input", "grad_filters"), got, same_order(x, f, g), strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, e), f"{name}: max diff {(a.float() - e.float()).abs().max().item()}"


@pytest.mark.parametrize(("threads", "blocks"), [(1, 1), (7, 3), (32, 2), (13, 5), (64, 1000)])
@pytest.mark.parametrize("k", [1, 5, 9])
def test_grid_stride_loop(threads: int, blocks: int, k: int) -> None:
    """Grids smaller than the tensors (each thread strides over many elements) and larger (idle threads).

    The outputs start as NaN and carry a NaN guard one grid long past their end: an element no thread writes
    fails the comparison, a loop running past its bound raises.
    """
    x, f, g = make(B, 3, H, W, k, torch.float64, seed=threads + k)
    sizes = (B * 3 * H * W, x.numel(), f.numel())
    if blocks < 1000:  # the last grid is larger than every tensor
        assert threads * blocks < min(sizes), "this grid must be smaller than the tensors"
    expected = same_order(x, f, g)
    got = emulate(x, f, g, threads, blocks)
    for name, a, e in zip(("forward", "grad_input", "grad_filters"), got, expected, strict=True):
        assert torch.equal(a, e), f"{name} with a grid of {blocks} x {threads} threads"


def test_launch_grid_is_capped_and_strides() -> None:
    """The CUDA launch caps its grid; beyond the cap the grid-stride loop must cover the rest."""
    threads, blocks = _C._cuda_launch_config(1)
    assert (threads, blocks) == (256, 1)
    assert _C._cuda_launch_config(256) == (256, 1)
    assert _C._cuda_launch_config(257) == (256, 2)
    cap = _C._cuda_launch_config(10**12)[1]
    assert cap == 65535 * 8 and 256 * cap < 10**12
    assert _C._cuda_launch_config(256 * cap + 1)[1] == cap
    # The capped grid, run for real on a tensor larger than it: 1 block of 256 threads vs 3*130*5*7 elements.
    x, f, g = make(B, 130, H, W, 3, torch.float32)
    for a, e in zip(emulate(x, f, g, threads=256, blocks=1), same_order(x, f, g), strict=True):
        assert torch.equal(a, e)


def test_noncontiguous_inputs_are_made_contiguous() -> None:
    """The launch makes its arguments contiguous, as the CUDA launch does; views give the same result."""
    x, f, g = make(2, 4, H, W, 3, torch.float64)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    ft = f.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    gt = g[:, :, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    assert not (xt.is_contiguous() or ft.is_contiguous() or gt.is_contiguous())
    for a, e in zip(emulate(xt, ft, gt, 5, 2), emulate(x, f, g, 5, 2), strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads per block"),
        ({"threads": 2048}, "threads per block"),
        ({"blocks": 0}, "blocks"),
    ],
)
def test_emulation_rejects_bad_grids(kwargs: dict[str, int], message: str) -> None:
    x, f, _ = make(1, 2, 3, 4, 3, torch.float64)
    with pytest.raises(ValueError, match=message):
        ops._emulate_cuda_threads_forward(x, f, **kwargs)


def test_emulation_validates_like_the_op() -> None:
    x, f, _ = make(1, 2, 3, 4, 3, torch.float64)
    with pytest.raises(ValueError, match="input"):
        ops._emulate_cuda_threads_forward(x[:, :, 1:], f)


CUDA_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "adaptive_conv_cuda.cu"


@pytest.mark.skipif(not CUDA_SOURCE.exists(), reason="needs the package's source tree")
def test_cuda_file_holds_launches_only() -> None:
    """Every __global__ kernel is one call into a thread body of adaptive_conv_threads.h (tested above)."""
    text = CUDA_SOURCE.read_text()
    kernels = re.findall(r"__global__ void (\w+)\([^)]*\)\s*\{(.*?)\n\}", text, re.S)
    assert {name for name, _ in kernels} == {"forward_kernel", "grad_input_kernel", "grad_filters_kernel"}
    for name, body in kernels:
        assert re.fullmatch(r"\s*threads::\w+_thread<[^;]*>\([^;]*\);\s*", body), f"{name}: {body}"
    assert "%" not in text and "for (" not in text, "index arithmetic or loops in the .cu file"
