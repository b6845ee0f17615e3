"""The op under the PyTorch 2 stack: opcheck (schema, fake kernel, autograd) and torch.compile."""

from __future__ import annotations

import pytest
import torch

import featup.kernels
from featup.kernels import adaptive_conv, adaptive_conv_reference


def _inputs(b: int, c: int, h: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(b, c, h + k - 1, w + k - 1, generator=gen), torch.randn(b, h, w, k, k, generator=gen)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad: bool) -> None:
    x, f = _inputs(2, 3, 5, 9, 3)
    torch.library.opcheck(
        torch.ops.featup.adaptive_conv.default,
        (x.requires_grad_(requires_grad), f.requires_grad_(requires_grad)),
    )


def test_opcheck_backward() -> None:
    x, f = _inputs(1, 4, 6, 10, 3)
    g = torch.randn(1, 4, 6, 10)
    torch.library.opcheck(torch.ops.featup.adaptive_conv_backward.default, (g, x, f))
    torch.library.opcheck(
        torch.ops.featup.adaptive_conv_backward.default, (g.double(), x.double(), f.double())
    )


def test_compile_fullgraph_forward_and_backward() -> None:
    def block(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # the pattern of the JBU: softmax-normalized kernels, then the adaptive conv, then a nonlinearity
        k = f.shape[-1]
        weights = torch.softmax(f.flatten(-2), dim=-1).unflatten(-1, (k, k))
        return torch.relu(adaptive_conv(x, weights))

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, f = _inputs(2, 3, 7, 5, 3)
    x.requires_grad_(True)
    f.requires_grad_(True)
    out = compiled(x, f)
    expected = block(x, f)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, f))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, f))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_compile_validates_through_fake_kernel() -> None:
    compiled = torch.compile(adaptive_conv, fullgraph=True, backend="eager")
    x, f = _inputs(1, 2, 4, 4, 3)
    with pytest.raises(Exception, match=r"expected input spatial size \(H\+K-1, W\+K-1\) = \(6, 6\)"):
        compiled(x[:, :, :5], f)


def test_fake_tensor_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 7, 12, 13)
        f = torch.empty(2, 8, 9, 5, 5)
        out = adaptive_conv(x, f)
        gi, gf = torch.ops.featup.adaptive_conv_backward(torch.empty(2, 7, 8, 9), x, f)
    assert out.shape == (2, 7, 8, 9) and gi.shape == x.shape and gf.shape == f.shape


def test_reference_is_compilable() -> None:
    x, f = _inputs(1, 2, 3, 4, 3)
    torch.testing.assert_close(
        torch.compile(adaptive_conv_reference, fullgraph=True, backend="eager")(x, f), adaptive_conv(x, f)
    )


def test_public_api() -> None:
    assert set(featup.kernels.__all__) == {"adaptive_conv", "adaptive_conv_reference", "build_info"}
