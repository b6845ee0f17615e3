"""Baselines: one call and shape for all, references for the resamplers and the reassembly, learnability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.core import (
    CARAFEUpsampler,
    ClassicJBU,
    ResizeConvUpsampler,
    SAPAUpsampler,
    create_upsampler,
    list_upsamplers,
)
from featup.core.baselines import CARAFEStage, lr_neighborhood_sum

torch.set_num_threads(1)

MINE = [
    "nearest",
    "bilinear",
    "bicubic",
    "resize_conv",
    "jbu_classic",
    "carafe",
    "sapa",
    "jbu",
    "bicubic_bp",
    "jbu_classic_bp",
]
LEARNABLE = ["resize_conv", "carafe", "sapa", "jbu"]


def test_all_baselines_are_registered():
    assert set(MINE) <= set(list_upsamplers())


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("out_size", [None, (23, 9), (5, 4), (61, 47)])
def test_same_call_and_shape(name, out_size):
    up = create_upsampler(name, feat_dim=6)
    assert not up.training
    x, image = torch.randn(2, 6, 5, 3), torch.rand(2, 3, 41, 27)
    out = up(x, image, output_size=out_size)
    assert out.shape == (2, 6, *(out_size or (41, 27)))
    assert out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,mode", [("nearest", "nearest-exact"), ("bilinear", "bilinear"), ("bicubic", "bicubic")]
)
def test_resamplers_are_unguided_interpolation(name, mode):
    up = create_upsampler(name)
    x = torch.randn(1, 4, 6, 5)
    kwargs = {} if mode.startswith("nearest") else {"align_corners": False}
    expected = F.interpolate(x, size=(25, 13), mode=mode, **kwargs)
    torch.testing.assert_close(up(x, output_size=(25, 13)), expected)
    torch.testing.assert_close(up(x, torch.rand(1, 3, 25, 13)), expected)
    with pytest.raises(ValueError, match="output_size"):
        up(x)


@pytest.mark.parametrize("name", LEARNABLE[:-1])
def test_learnable_baselines_need_feat_dim_and_check_channels(name):
    with pytest.raises(ValueError, match="feat_dim"):
        create_upsampler(name)
    up = create_upsampler(name, feat_dim=4)
    with pytest.raises(ValueError, match="4 channels"):
        up(torch.randn(1, 5, 3, 3), torch.rand(1, 3, 12, 12))


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_baselines_get_gradients_everywhere(name):
    up = create_upsampler(name, feat_dim=4).train()
    for m in up.modules():  # dropout would make "every parameter" random
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    x, image = torch.randn(2, 4, 3, 4, requires_grad=True), torch.rand(2, 3, 48, 64)
    # one optimizer step first: a safe-start JBU is exactly a resize at initialisation (zero-initialised gates,
    # tested in test_jbu), so its gated parameters learn from the second step on
    opt = torch.optim.Adam(up.parameters(), lr=1e-2)
    out = up(x, image)
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    opt.zero_grad()
    x.grad = None
    out = up(x, image)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


def test_classic_jbu_sharpens_an_edge_bilinear_blurs():
    image = torch.zeros(1, 3, 64, 64)
    image[..., 37:] = 1.0  # the edge falls inside a low-res cell
    feats = image[:, :1, 4::8, 4::8].contiguous()  # low-res features: the image sampled at cell centers
    target = image[:, :1]
    jbu = create_upsampler("jbu_classic")(feats, image)  # bicubic steps + fixed bilateral kernels
    bic = create_upsampler("bicubic")(feats, image)
    assert (jbu - target).abs().mean() < 0.75 * (bic - target).abs().mean()
    bil = create_upsampler("bilinear")(feats, image)
    assert (jbu - target).abs().mean() < (bil - target).abs().mean()
    const = torch.full((1, 2, 8, 8), -1.5)  # normalized kernels preserve constants
    torch.testing.assert_close(
        create_upsampler("jbu_classic")(const, image), torch.full((1, 2, 64, 64), -1.5)
    )


def test_classic_jbu_kernel_is_the_fixed_bilateral_product():
    up = ClassicJBU(radius=1, sigma_spatial=0.8, sigma_range=0.2)
    g = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    gp = F.pad(g, [1] * 4, mode="reflect")
    patches = F.unfold(gp, 3).view(1, 3, 9, 5, 6)
    coords = torch.linspace(-1, 1, 3, dtype=torch.float64)
    spatial = torch.exp(-(coords[:, None] ** 2 + coords[None] ** 2) / (2 * 0.8**2)).view(1, 9, 1, 1)
    rng = torch.exp(-(patches - g[:, :, None]).square().sum(1) / (2 * 0.2**2))
    expected = rng * spatial / (rng * spatial).sum(1, keepdim=True)
    torch.testing.assert_close(up.kernel(g), expected)
    assert list(up.parameters()) == []


def test_carafe_reassembly_matches_the_definition_at_2x():
    """out[c, 2y + a, 2x + b] = sum_ij W[ij, 2y + a, 2x + b] * x_pad[c, y + i, x + j] (replicate padding)."""
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    weights = torch.softmax(torch.randn(1, 9, 8, 10, dtype=torch.float64), dim=1)
    patches = F.unfold(F.pad(x, [1] * 4, mode="replicate"), 3).view(1, 3, 9, 4, 5)
    patches = patches.repeat_interleave(2, -2).repeat_interleave(2, -1)
    expected = (patches * weights[:, None]).sum(2)
    torch.testing.assert_close(lr_neighborhood_sum(weights, x, 1), expected)


def test_carafe_and_sapa_reproduce_constants():
    const = torch.full((1, 4, 6, 5), 0.7)
    image = torch.rand(1, 3, 24, 19)
    for up in (CARAFEUpsampler(feat_dim=4).eval(), SAPAUpsampler(feat_dim=4).eval()):
        # softmax weights sum to one and replicate padding keeps the border in the feature space
        torch.testing.assert_close(up(const, image), torch.full((1, 4, 24, 19), 0.7))
    stage = CARAFEStage(4)
    assert stage(const, (12, 12)).shape == (1, 4, 12, 12)


@pytest.mark.parametrize("cls", [ResizeConvUpsampler, CARAFEUpsampler, SAPAUpsampler])
def test_learnable_baselines_round_trip(cls, tmp_path):
    up = cls(feat_dim=3).eval()
    path = up.save(tmp_path / cls.__name__)
    loaded = cls.load(path)
    x, image = torch.randn(1, 3, 4, 5), torch.rand(1, 3, 17, 21)
    torch.testing.assert_close(loaded(x, image), up(x, image))
