"""Mixed precision: autocast paths stay close to float32, and the adaptive conv accumulates in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featup.core.jbu import JBUStack
from featup.core.precision import (
    adaptive_conv_autocast_error,
    gradient_precision_error,
    make_grad_scaler,
    mixed_precision,
    precision_error,
    resolve_precision,
    upsample_mixed,
)
from featup.kernels import adaptive_conv_reference

#: one rounding of the output in each dtype (unit roundoff), the most float32 accumulation may add
ONE_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(c=8, h=7, w=9, scale=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, h, w, generator=g), torch.rand(1, 3, h * scale, w * scale, generator=g)


def _naive_low_precision_conv(inp, filt):
    """Adaptive conv summing the 49 taps in the low-precision dtype: what float32 accumulation avoids."""
    k, (h, w) = filt.shape[-1], filt.shape[1:3]
    acc = torch.zeros(inp.shape[0], inp.shape[1], h, w, dtype=inp.dtype)
    for i in range(k):
        for j in range(k):
            acc = acc + filt[:, None, :, :, i, j] * inp[:, :, i : i + h, j : j + w]
    return acc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaptive_conv_accumulates_in_float32(dtype):
    res = adaptive_conv_autocast_error(dtype)
    assert res["rel_max"] <= 1.05 * ONE_ROUNDING[dtype]
    # the bound is discriminating: summing in the low-precision dtype breaks it on the same inputs
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(1, 16, 30, 30, generator=g).to(dtype)
    filt = torch.softmax(torch.randn(1, 24, 24, 49, generator=g), -1).view(1, 24, 24, 7, 7).to(dtype)
    ref = adaptive_conv_reference(inp.double(), filt.double())
    naive = (_naive_low_precision_conv(inp, filt).double() - ref).abs().max() / ref.abs().max()
    assert naive > 1.5 * ONE_ROUNDING[dtype]


@pytest.mark.parametrize(
    ("dtype", "rel_l2", "cos"), [(torch.bfloat16, 2e-2, 0.999), (torch.float16, 3e-3, 0.9999)]
)
def test_upsample_mixed_error_bound(dtype, rel_l2, cos):
    torch.manual_seed(0)
    up = JBUStack().eval()
    lr, img = _inputs()
    out = upsample_mixed(up, lr, img, dtype=dtype)
    assert out.dtype == torch.float32 and out.shape == (1, 8, 112, 144)
    err = precision_error(up, lr, img, dtype=dtype)
    assert 0 < err.rel_l2 < rel_l2
    assert err.min_cosine > cos
    assert err.rel_max < 10 * rel_l2


def test_upsample_mixed_tiled_matches_untiled():
    torch.manual_seed(0)
    up = JBUStack().eval()
    lr, img = _inputs(h=24, w=20, scale=4)
    whole = upsample_mixed(up, lr, img, dtype=torch.bfloat16)
    tiled = upsample_mixed(up, lr, img, dtype=torch.bfloat16, tile=24)
    ref = upsample_mixed(up, lr, img, dtype=torch.float32)
    # tiling changes only the low-precision rounding, never more than mixed precision itself does
    assert (tiled - whole).norm() <= 2 * (whole - ref).norm() + 1e-6


# with the default stack's back-projection: bfloat16 0.092 relative / cosine 0.9991, float16 0.0108 / 1.0
# (without it, JBUStack(consistency=False): 0.010 and 0.0003): it removes each cell's mean from the gradient,
# so the parameter gradients are sums with more cancellation, computed by the low-precision backward
@pytest.mark.parametrize(
    ("dtype", "bound", "cos"), [(torch.bfloat16, 0.12, 0.998), (torch.float16, 0.015, 0.999)]
)
def test_gradient_precision_error_training(dtype, bound, cos):
    torch.manual_seed(0)
    up = JBUStack().train()
    lr, img = _inputs(c=6, h=6, w=5)
    target = torch.randn(1, 6, 96, 80, generator=torch.Generator().manual_seed(1))

    def loss_fn(m):
        torch.manual_seed(0)  # same dropout masks in both runs
        return (m(lr, img) - target).square().mean()

    errs = gradient_precision_error(up, loss_fn, dtype=dtype)
    assert set(errs) == {n for n, p in up.named_parameters() if p.requires_grad} | {"all"}
    assert 0 < errs["all"].rel_l2 < bound
    assert errs["all"].min_cosine > cos
    assert all(p.grad is None for p in up.parameters())


def test_mixed_precision_context_and_scaler():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with mixed_precision("bf16"):
        assert lin(x).dtype == torch.bfloat16
    with mixed_precision("fp32"):
        assert lin(x).dtype == torch.float32
    assert make_grad_scaler("fp16").is_enabled()
    assert not make_grad_scaler("bf16").is_enabled()
    assert resolve_precision(None) is torch.float32
    assert resolve_precision("bfloat16") is torch.bfloat16


def test_exceptions():
    with pytest.raises(ValueError, match="expected precision fp32, bf16 or fp16"):
        resolve_precision("int8")
    with pytest.raises(ValueError, match="expected dtype"):
        resolve_precision(torch.int32)
    with pytest.raises(ValueError, match="trainable parameters"):
        gradient_precision_error(nn.ReLU(), lambda m: torch.zeros(()))
    lr, img = _inputs()
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        upsample_mixed(JBUStack(), lr, img[:, :2])


def _trained_like_stack(temperature: float, seed: int) -> JBUStack:
    """A stack as training leaves it: the bilateral kernels on (gates 1), a sharp range kernel (high
    temperature), unit-scale weights."""
    import math
    import zlib

    up = JBUStack(key_dim=16)
    with torch.no_grad():
        for name, p in up.named_parameters():
            g = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(name.encode()))
            if name.endswith(".gate"):
                p.fill_(1.0)
            elif name.endswith("sigma_spatial"):
                p.fill_(0.6)
            elif name.endswith("range_temp"):
                p.fill_(math.log(temperature))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return up.eval()


@pytest.mark.parametrize("temperature", [30.0, 300.0])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 0.015), (torch.float16, 0.002)])
def test_autocast_keeps_the_range_path_in_float32_at_high_temperature(temperature, dtype, bound):
    """|a|^2 + |b|^2 - 2<a,b> from low-precision keys cancels badly and exp(range_temp) multiplies the error.

    Measured (seeds 0 / 1 / 2 of the weights, temperature 30 and 300): with the kernels in float32 the relative
    L2 error is 0.0051-0.0057 in bfloat16 and 0.00045-0.00052 in float16 (one rounding of the output); computing
    them under autocast gave 0.09-0.23 / 0.03-0.08 at 30 and 0.29-0.40 / 0.18-0.26 at 300.
    """
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 80), indexing="ij")
    shade = 0.5 + 0.3 * torch.sin(4 * xx + 3 * yy) + 0.3 * ((xx - 0.3 * yy) > 0.1).float()
    img = shade.expand(1, 3, -1, -1) * torch.rand(1, 3, 1, 1, generator=g)
    img = (img + 0.03 * torch.randn(1, 3, 96, 80, generator=g)).clamp(0, 1)
    lr = torch.randn(1, 16, 6, 5, generator=g)
    up = _trained_like_stack(temperature, seed=0)
    with torch.no_grad():
        ref = up(lr, img)
        with torch.autocast("cpu", dtype=dtype):
            out = up(lr, img)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < bound, rel  # > 0: the features' convolution does run in the low precision
