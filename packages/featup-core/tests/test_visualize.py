"""PCA-to-RGB fitted on low-res features and applied to high-res ones; heat-map rendering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.core.visualize import colorize, fit_pca_rgb, pca_rgb, salience_rgb, uncertainty_rgb

torch.set_num_threads(1)


def _features(b=2, c=16, h=7, w=9, seed=0):
    """Features with three known, exactly uncorrelated latent directions of decreasing variance."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(c, 3, generator=g))[0].T  # orthonormal directions
    n = b * h * w
    samples = torch.randn(n, 3, generator=g)
    samples = torch.linalg.qr(samples - samples.mean(0))[0] * n**0.5  # centered, exactly uncorrelated
    z = (samples * torch.tensor([5.0, 2.0, 0.5])).view(b, h, w, 3).permute(0, 3, 1, 2)
    return torch.einsum("bkhw,kc->bchw", z, basis) + 0.01 * torch.randn(b, c, h, w, generator=g), z


def test_shapes_range_and_order():
    lr, _ = _features()
    hr1, hr2 = torch.randn(2, 16, 29, 31), torch.randn(1, 16, 8, 8)
    out = pca_rgb(lr, hr1, hr2)
    assert [o.shape for o in out] == [(2, 3, 7, 9), (2, 3, 29, 31), (1, 3, 8, 8)]
    for o in out:
        assert o.dtype == torch.float32 and o.min() >= 0 and o.max() <= 1


def test_projection_is_fitted_on_low_res_and_applied_pointwise():
    lr, _ = _features()
    hr = F.interpolate(lr, scale_factor=4, mode="nearest")
    rgb_lr, rgb_hr = pca_rgb(lr, hr)
    torch.testing.assert_close(rgb_hr, F.interpolate(rgb_lr, scale_factor=4, mode="nearest"))
    # a high-res map far outside the low-res range saturates instead of re-stretching the colors
    (rgb_far,) = pca_rgb(lr, 100 * hr)[1:]
    assert ((rgb_far == 0) | (rgb_far == 1)).float().mean() > 0.9


def test_components_follow_the_variance():
    lr, z = _features()
    mean, comps, low, high = fit_pca_rgb(lr)
    proj = torch.einsum("bchw,kc->bkhw", lr - mean.view(1, -1, 1, 1), comps)
    for k in range(3):  # component k recovers latent k (largest variance first), up to sign
        corr = torch.corrcoef(torch.stack([proj[:, k].flatten(), z[:, k].flatten()]))[0, 1]
        assert corr.abs() > 0.99
    assert (proj.flatten(2).var(-1).mean(0)[:-1] >= proj.flatten(2).var(-1).mean(0)[1:]).all()
    assert (low < high).all()
    again = fit_pca_rgb(lr)[1]
    torch.testing.assert_close(again, comps)  # deterministic signs


def test_fewer_channels_than_colors():
    lr = torch.randn(1, 2, 5, 5)
    out = pca_rgb(lr)[0]
    assert out.shape == (1, 3, 5, 5)
    assert torch.isfinite(out).all()


def test_channel_mismatch_raises():
    lr, _ = _features()
    with pytest.raises(ValueError, match="16 channels"):
        pca_rgb(lr, torch.randn(1, 8, 4, 4))


def test_colorize_heat_maps():
    ramp = torch.linspace(-3, 5, 30).view(1, 1, 1, 30).expand(2, 1, 4, 30)
    gray = colorize(ramp, "gray")
    assert gray.shape == (2, 3, 4, 30)
    assert (gray[0, 0, 0].diff() >= 0).all() and gray[0, 0, 0, 0] == 0 and gray[0, 0, 0, -1] == 1
    fixed = colorize(ramp, "gray", vmin=0.0, vmax=1.0)
    assert (fixed[0, 0, 0, :11] == 0).all()  # values below vmin clamp
    unc = uncertainty_rgb(torch.randn(2, 1, 6, 7), size=(24, 28))
    sal = salience_rgb(torch.rand(3, 1, 10, 12))
    assert unc.shape == (2, 3, 24, 28) and sal.shape == (3, 3, 10, 12)
    assert unc.min() >= 0 and unc.max() <= 1 and sal.min() >= 0 and sal.max() <= 1
    with pytest.raises(ValueError, match=r"\(B,1,h,w\)"):
        colorize(torch.rand(2, 3, 4, 4))
