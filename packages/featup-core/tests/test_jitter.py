"""Jitter: identity, flip involution, geometry against an analytic reference, image/feature consistency."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featup.core.jitter import JitterParams, apply_jitter, jitter_grid, sample_jitter


def smooth_field(h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """An asymmetric, low-frequency 3-channel function at the pixel centres of an (h, w) grid in [-1, 1]."""
    y = (2 * torch.arange(h, dtype=dtype) + 1) / h - 1
    x = (2 * torch.arange(w, dtype=dtype) + 1) / w - 1
    return analytic(y[:, None], x[None, :])[None]


def analytic(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            torch.sin(1.3 * x + 0.4) + 0.5 * y,
            torch.cos(1.1 * y - 0.7 * x),
            0.3 * x * y + 0.6 * x + 0.2,
        ]
    )


def reflect(v: torch.Tensor) -> torch.Tensor:
    """Fold a normalized coordinate into [-1, 1] by mirroring about the borders (one fold is enough here)."""
    v = torch.where(v < -1, -2 - v, v)
    return torch.where(v > 1, 2 - v, v)


def reference_jitter(p: JitterParams, h: int, w: int) -> torch.Tensor:
    """The jitter written independently from its definition: pad, zoom, crop, flip in pixel units."""
    out = torch.empty(3, h, w, dtype=torch.float64)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    if p.flip:
        xs = (w - 1) - xs
    # padded map: (h + 2 pad_h) x (w + 2 pad_w) px; zoomed by z; crop of h x w px at offset of the free room
    pad_h, pad_w = p.pad * h, p.pad * w
    free_h = (h + 2 * pad_h) * p.zoom - h
    free_w = (w + 2 * pad_w) * p.zoom - w
    # position of the output pixel centre in zoomed-padded pixel units -> original pixel units
    yz = (p.top * free_h + ys + 0.5) / p.zoom - pad_h
    xz = (p.left * free_w + xs + 0.5) / p.zoom - pad_w
    out[:] = analytic(reflect(2 * yz / h - 1), reflect(2 * xz / w - 1))
    return out[None]


def test_identity_params_give_identity():
    x = torch.randn(2, 5, 13, 9)
    for p in (JitterParams(), JitterParams(pad=0.2), JitterParams(pad=0.1, top=0.5, left=0.5)):
        assert p.is_identity
        torch.testing.assert_close(apply_jitter(x, p), x, rtol=0, atol=0)
    # a non-identity parameter set that still maps pixels onto themselves numerically
    grid = jitter_grid(JitterParams(), (13, 9), dtype=torch.float64)
    y = torch.nn.functional.grid_sample(x.double(), grid.expand(2, -1, -1, -1), align_corners=False)
    torch.testing.assert_close(y, x.double(), atol=1e-12, rtol=0)


def test_flip_is_an_involution_and_mirrors():
    x = torch.randn(2, 4, 11, 17)
    p = JitterParams(flip=True)
    assert torch.equal(apply_jitter(x, p), x.flip(-1))
    assert torch.equal(apply_jitter(apply_jitter(x, p), p), x)
    # with zoom and pad too: flipping the jittered map undoes the flip of the jitter
    q = JitterParams(pad=0.1, zoom=1.4, top=0.3, left=0.8, flip=True)
    assert torch.equal(apply_jitter(x, q).flip(-1), apply_jitter(x, JitterParams(0.1, 1.4, 0.3, 0.8, False)))


def test_integer_shift_is_exact_with_reflect_padding():
    # pad 2 px on a 10-px axis, offset 0 => output starts 2 px before the image: symmetric padding
    x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 3, 10).contiguous()
    p = JitterParams(pad=0.2, top=0.5, left=0.0)
    y = apply_jitter(x, p)
    torch.testing.assert_close(y[0, 0, 1], torch.tensor([1.0, 0, 0, 1, 2, 3, 4, 5, 6, 7]), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    pad=st.floats(0.0, 0.2),
    zoom=st.floats(1.0, 2.0),
    top=st.floats(0.0, 1.0),
    left=st.floats(0.0, 1.0),
    flip=st.booleans(),
    h=st.integers(40, 70),
    w=st.integers(40, 70),
)
def test_geometry_matches_analytic_reference(pad, zoom, top, left, flip, h, w):
    p = JitterParams(pad=pad, zoom=zoom, top=top, left=left, flip=flip)
    got = apply_jitter(smooth_field(h, w), p)
    ref = reference_jitter(p, h, w)
    # bilinear interpolation of a smooth field: error is second order in the pixel size, plus a half-pixel
    # clamp at the borders
    assert (got - ref).abs().max() < 0.06


def test_same_params_same_geometry_at_any_resolution():
    p = JitterParams(pad=30 / 224, zoom=1.6, top=0.2, left=0.9, flip=True)
    for h, w in ((45, 61), (90, 122), (180, 244)):
        got = apply_jitter(smooth_field(h, w), p)
        assert (got - reference_jitter(p, h, w)).abs().max() < 0.06 * 45 / h


def test_jitter_commutes_with_pointwise_features():
    """jitter(f(image)) == f(jitter(image)) for a per-pixel feature map f (within interpolation error)."""
    gen = torch.Generator().manual_seed(0)
    image = (smooth_field(64, 48).float() + 1) / 3
    weight = torch.randn(8, 3, generator=gen)

    def featurize(img: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("dc,bchw->bdhw", weight, img))

    for _ in range(6):
        p = sample_jitter(gen, max_pad=30, max_zoom=2.0, ref_size=64)
        a = apply_jitter(featurize(image), p)
        b = featurize(apply_jitter(image, p))
        assert (a - b).abs().max() < 2e-2
        assert a.shape == image.shape[:1] + (8,) + image.shape[2:]


def test_per_item_params_match_single_params():
    x = torch.randn(3, 2, 15, 21)
    gen = torch.Generator().manual_seed(1)
    ps = [sample_jitter(gen, ref_size=21) for _ in range(3)]
    batched = apply_jitter(x, ps)
    for i, p in enumerate(ps):
        torch.testing.assert_close(batched[i : i + 1], apply_jitter(x[i : i + 1], p))


def test_sample_jitter_is_seeded_and_in_range():
    a = [sample_jitter(torch.Generator().manual_seed(5), max_zoom=1.8) for _ in range(2)]
    assert a[0] == a[1]
    gen = torch.Generator().manual_seed(0)
    draws = [sample_jitter(gen, max_pad=30, max_zoom=1.8, ref_size=224) for _ in range(400)]
    assert all(math.isclose(d.pad, 30 / 224) for d in draws)
    assert all(1.0 <= d.zoom <= 1.8 for d in draws)
    zoomed = sum(d.zoom > 1 for d in draws) / len(draws)
    flipped = sum(d.flip for d in draws) / len(draws)
    assert 0.4 < zoomed < 0.6 and 0.4 < flipped < 0.6
    never = [sample_jitter(gen, p_zoom=0.0, p_flip=0.0) for _ in range(20)]
    assert all(d.zoom == 1.0 and not d.flip for d in never)


def test_params_round_trip_dict():
    p = JitterParams(pad=0.1, zoom=1.5, top=0.25, left=0.75, flip=True)
    assert JitterParams.from_dict(p.to_dict()) == p


def test_gradient_flows_and_gradcheck():
    p = JitterParams(pad=0.15, zoom=1.3, top=0.3, left=0.6, flip=True)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_jitter(t, p), (x,))


def test_device_and_dtype_follow_input():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    y = apply_jitter(x, JitterParams(zoom=1.5))
    assert y.dtype == torch.float64 and y.device == x.device


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"\(B,C,H,W\)"):
        apply_jitter(torch.randn(3, 8, 8), JitterParams())
    with pytest.raises(TypeError):
        apply_jitter([1, 2], JitterParams())
    with pytest.raises(ValueError, match="one JitterParams per batch item"):
        apply_jitter(torch.randn(2, 3, 8, 8), [JitterParams()])
    with pytest.raises(ValueError, match="zoom"):
        JitterParams(zoom=0.0)
    with pytest.raises(ValueError, match="top/left"):
        JitterParams(top=1.5)
    with pytest.raises(ValueError, match="max_zoom"):
        sample_jitter(None, max_zoom=0.5)
