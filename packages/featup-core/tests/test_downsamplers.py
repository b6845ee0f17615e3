"""Downsamplers: window placement, kernel normalisation, eq. 2 vs a dense reference, gradients, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from featup.core.downsamplers import (
    AttentionDownsampler,
    SimpleDownsampler,
    create_downsampler,
    window_indices,
    window_pool,
)


def dense_attention_reference(ds: AttentionDownsampler, hr: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Eq. 2 written with explicit loops over output pixels and an explicit window."""
    b, c, H, W = hr.shape
    k = ds.kernel_size
    sal = F.conv2d(hr, ds.salience_net[1].weight, ds.salience_net[1].bias)[:, 0]
    out = torch.zeros(b, c, h, w, dtype=hr.dtype)
    for i in range(h):
        r0 = int(torch.floor(torch.tensor((i + 0.5) * H / h - k / 2 + 0.5, dtype=torch.float64)))
        for j in range(w):
            c0 = int(torch.floor(torch.tensor((j + 0.5) * W / w - k / 2 + 0.5, dtype=torch.float64)))
            logits, feats = [], []
            for u in range(k):
                for v in range(k):
                    y, x = r0 + u, c0 + v
                    if 0 <= y < H and 0 <= x < W:
                        logits.append(ds.weight[u, v] * sal[:, y, x] + ds.bias[u, v])
                        feats.append(hr[:, :, y, x])
            a = torch.stack(logits, -1).softmax(-1)  # (B, n)
            out[:, :, i, j] = (torch.stack(feats, -1) * a[:, None]).sum(-1)
    return out


def test_vit_grid_windows_are_the_patches():
    idx, valid = window_indices(224, 14, 16)
    assert valid.all()
    torch.testing.assert_close(idx[:, 0], torch.arange(14) * 16)
    # odd ratios: windows centred on the footprint, clipped at the borders
    idx, valid = window_indices(37, 5, 9)
    centres = (torch.arange(5) + 0.5) * 37 / 5
    win_centres = torch.where(valid, idx, 0).sum(1) / valid.sum(1)
    assert ((win_centres - (centres - 0.5)).abs() <= 2.5).all()
    assert valid[:, 4].all()  # the central tap always exists


@settings(max_examples=15, deadline=None)
@given(
    H=st.integers(5, 40), W=st.integers(5, 40), h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 12)
)
def test_shapes_and_constant_preservation_any_sizes(H, W, h, w, k):
    torch.manual_seed(0)
    hr = torch.full((2, 3, H, W), 0.7) + torch.tensor([0.0, 1.0, -2.0]).view(1, 3, 1, 1)
    for ds in (SimpleDownsampler(k), AttentionDownsampler(3, k)):
        with torch.no_grad():
            if isinstance(ds, SimpleDownsampler):
                ds.kernel_logits.normal_()
        out = ds.eval()(hr, (h, w))
        assert out.shape == (2, 3, h, w)
        torch.testing.assert_close(out, hr[:, :, :1, :1].expand(2, 3, h, w), atol=1e-5, rtol=0)


def test_simple_kernel_is_normalised_and_non_negative():
    ds = SimpleDownsampler(5)
    with torch.no_grad():
        ds.kernel_logits.normal_(0, 3)
    assert (ds.kernel >= 0).all()
    torch.testing.assert_close(ds.kernel.sum(), torch.tensor(1.0))
    weights = ds.kernels(torch.zeros(1, 1, 11, 7), (3, 2))
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, 3, 2))


def test_simple_matches_strided_conv_on_exact_grid():
    ds = SimpleDownsampler(4)
    with torch.no_grad():
        ds.kernel_logits.normal_()
    hr = torch.randn(2, 3, 16, 24)
    ref = F.conv2d(hr.reshape(6, 1, 16, 24), ds.kernel[None, None], stride=4).reshape(2, 3, 4, 6)
    torch.testing.assert_close(ds(hr, (4, 6)), ref, atol=1e-5, rtol=1e-5)


def test_box_kernel_is_average_pooling():
    hr = torch.randn(1, 5, 28, 42)
    torch.testing.assert_close(SimpleDownsampler(7)(hr, (4, 6)), F.avg_pool2d(hr, 7), atol=1e-5, rtol=1e-5)


def test_attention_matches_dense_reference_odd_sizes():
    torch.manual_seed(0)
    ds = AttentionDownsampler(4, 5).eval()
    with torch.no_grad():
        ds.weight.normal_()
        ds.bias.normal_()
    hr = torch.randn(2, 4, 13, 10, dtype=torch.float64)
    ds = ds.double()
    torch.testing.assert_close(ds(hr, (3, 4)), dense_attention_reference(ds, hr, 3, 4))


def test_attention_salience_shape_and_kernels_sum_to_one():
    ds = AttentionDownsampler(6, 7).eval()
    hr = torch.randn(2, 6, 19, 23)
    assert ds.salience(hr).shape == (2, 1, 19, 23)
    k = ds.kernels(hr, (4, 5))
    assert k.shape == (2, 4, 5, 7, 7)
    torch.testing.assert_close(k.sum((-1, -2)), torch.ones(2, 4, 5))


def test_eval_deterministic_train_stochastic():
    ds = AttentionDownsampler(8, 4)
    hr = torch.randn(1, 8, 16, 16)
    ds.eval()
    torch.testing.assert_close(ds(hr, 4), ds(hr, 4), rtol=0, atol=0)
    ds.train()
    assert not torch.equal(ds(hr, 4), ds(hr, 4))  # dropout before the salience conv


def dense_window_pool(x: torch.Tensor, weights: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Gather every window explicitly (taps outside the map skipped) and contract."""
    kh, kw = weights.shape[-2:]
    rows, vr = window_indices(x.shape[-2], h, kh)
    cols, vc = window_indices(x.shape[-1], w, kw)
    patches = x[:, :, rows][:, :, :, :, cols]  # (B, C, h, kh, w, kw)
    mask = (vr[:, :, None, None] & vc[None, None, :, :]).to(x.dtype)
    return torch.einsum("bcikjl,bijkl,ikjl->bcij", patches, weights.expand(x.shape[0], -1, -1, -1, -1), mask)


@pytest.mark.parametrize(
    "shape", [(9, 7, 3, 2, 4, 5), (13, 30, 4, 3, 7, 6), (5, 5, 5, 5, 3, 3), (20, 11, 2, 7, 9, 4)]
)
def test_window_pool_matches_dense_gather(shape):
    H, W, h, w, kh, kw = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64)
    wts = torch.rand(2, h, w, kh, kw, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(window_pool(x, wts, (h, w)), dense_window_pool(x, wts, h, w))
    shared = wts[:1]
    torch.testing.assert_close(window_pool(x, shared, (h, w)), dense_window_pool(x, shared, h, w))


def test_window_pool_gradcheck():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    wts = torch.rand(2, 3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: window_pool(a, b, (3, 2)), (x, wts))
    # border windows (taps outside the map) and a broadcast weight batch
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    wts = torch.rand(1, 2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: window_pool(a, b, (2, 3)), (x, wts))


@pytest.mark.parametrize("cls", ["simple", "attention"])
def test_gradcheck_modules(cls):
    torch.manual_seed(0)
    ds = create_downsampler(cls, 3, 4).double().eval()
    hr = torch.randn(1, 3, 10, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ds(t, (3, 2)), (hr,))
    ds(hr, (3, 2)).square().sum().backward()
    for name, p in ds.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_noncontiguous_input():
    ds = AttentionDownsampler(3, 5).eval()
    hr = torch.randn(1, 12, 3, 20).permute(0, 2, 1, 3)  # (1, 3, 12, 20) non-contiguous
    assert not hr.is_contiguous()
    torch.testing.assert_close(ds(hr, (3, 5)), ds(hr.contiguous(), (3, 5)))


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"\(B,C,H,W\)"):
        SimpleDownsampler(3)(torch.randn(3, 8, 8), 2)
    with pytest.raises(ValueError, match="channels"):
        AttentionDownsampler(4, 3)(torch.randn(1, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="output_size"):
        SimpleDownsampler(3)(torch.randn(1, 3, 8, 8), (0, 2))
    with pytest.raises(ValueError, match="unknown downsampler"):
        create_downsampler("bilinear", 3, 3)


def test_gaussian_blur_keeps_constants_and_commutes_with_channel_mixing():
    from featup.core.downsamplers import gaussian_blur

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64)
    mix = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        gaussian_blur(torch.einsum("bchw,cd->bdhw", x, mix)),
        torch.einsum("bchw,cd->bdhw", gaussian_blur(x), mix),
    )
    const = torch.full((1, 2, 7, 6), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const), const)
    assert not torch.allclose(gaussian_blur(x), x)


def test_attention_blur_windows_the_blurred_map():
    from featup.core.downsamplers import gaussian_blur

    torch.manual_seed(0)
    plain = AttentionDownsampler(3, 4).eval()
    blurred = AttentionDownsampler(3, 4, blur=True).eval()
    blurred.load_state_dict(plain.state_dict())
    hr = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(blurred(hr, 4), plain(gaussian_blur(hr), 4))
    assert not torch.allclose(blurred(hr, 4), plain(hr, 4))
    torch.testing.assert_close(plain.salience_kernels(plain.salience(hr), 4), plain.kernels(hr, 4))
    with pytest.raises(TypeError, match="blur"):
        AttentionDownsampler(3, 4, blur="yes")


def test_gaussian_blur_equals_the_depthwise_convolution_and_its_gradients():
    """The shifted multiply-add blur against its definition: a depthwise 2-D convolution with the outer
    product of the 1-D Gaussian, reflect-padded (outputs and input gradients, float64)."""
    import torch.nn.functional as F

    from featup.core.downsamplers import gaussian_blur

    for shape, k, sigma in [((2, 3, 12, 9), 5, 1.0), ((1, 2, 3, 3), 5, 0.7), ((1, 1, 7, 6), 3, 2.0)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        r = k // 2
        coords = torch.arange(k, dtype=torch.float64) - r
        g = torch.exp(-coords.square() / (2 * sigma**2))
        g = g / g.sum()
        mode = "reflect" if min(shape[-2:]) > r else "replicate"
        flat = F.pad(x.reshape(-1, 1, *shape[-2:]), [r] * 4, mode=mode)
        ref = F.conv2d(flat, torch.outer(g, g).view(1, 1, k, k)).view(shape)
        out = gaussian_blur(x, k, sigma)
        torch.testing.assert_close(out, ref)
        weight = torch.randn(shape, dtype=torch.float64)
        (g_ours,) = torch.autograd.grad((out * weight).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * weight).sum(), x)
        torch.testing.assert_close(g_ours, g_ref)
