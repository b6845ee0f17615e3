"""The contract shared by every backbone: eval lock, gradients, use_norm, fitting, input checks, wrapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from featup.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    channel_norm,
    create_backbone,
    wrap_backbone,
)


class TinyNet(nn.Module):
    """Conv (stride 4) + BatchNorm + Dropout: train mode would change its output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=4, stride=4)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)))


def _tiny(**kw) -> Backbone:
    torch.manual_seed(0)
    return wrap_backbone(TinyNet(), mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


def test_eval_mode_survives_train_on_a_parent():
    bb = _tiny()
    parent = nn.Sequential(bb, nn.Conv2d(6, 2, 1))
    parent.train()
    assert parent.training and parent[1].training
    assert not bb.training and not any(m.training for m in bb.modules())
    image = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(bb(image), bb(image))  # dropout stays off, batch norm uses running stats


def test_registered_backbone_stays_in_eval_mode(built):
    bb = built("dino_vits8")
    nn.Sequential(bb).train()
    assert not any(m.training for m in bb.modules())


def test_unfrozen_backbone_trains_normally():
    bb = create_backbone("resnet50", frozen=False)
    assert all(p.requires_grad for p in bb.parameters())
    bb.train()
    assert bb.training and bb.model.bn1.training
    bb.eval()
    assert not bb.model.bn1.training


def test_gradients_reach_the_image_not_the_weights(built):
    bb = built("dinov2_vits14")
    image = torch.rand(1, 3, 28, 42, requires_grad=True)
    bb(image).square().mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_use_norm_is_a_channel_layernorm_without_affine(built):
    plain = built("dino_vits16")
    normed = create_backbone("dino_vits16", use_norm=True, model_kwargs={"depth": 2})
    normed.model.load_state_dict(plain.model.state_dict())
    assert not any("norm" in k for k in set(normed.state_dict()) - set(plain.state_dict()))  # no new weights
    image = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        raw, out = plain(image), normed(image)
    ref = F.layer_norm(raw.permute(0, 2, 3, 1), (raw.shape[1],)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean(1), torch.zeros_like(out[:, 0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones_like(out[:, 0]), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"expected features \(B,C,h,w\)"):
        channel_norm(raw[0])


def test_wrap_infers_metadata_with_one_probe():
    calls = []
    net = TinyNet()
    net.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    bb = wrap_backbone(net)
    assert (bb.feat_dim, bb.stride, bb.mean, bb.std) == (6, 4, None, None)
    assert calls == [(1, 3, 224, 224)]
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert bb(torch.rand(2, 3, 32, 40)).shape == (2, 6, 8, 10)


def test_wrap_normalizes_exactly_once():
    bb = _tiny()
    image = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        ref = bb.model(
            (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        )
        torch.testing.assert_close(bb(image), ref)
    raw = wrap_backbone(bb.model, feat_dim=6, stride=4)  # no mean/std: the [0,1] image reaches the net
    with torch.no_grad():
        torch.testing.assert_close(raw(image), bb.model(image))


def test_wrap_plain_callables_and_dict_outputs():
    def fn(x):
        return {"out": F.avg_pool2d(x, 8)}

    bb = wrap_backbone(fn)
    assert (bb.feat_dim, bb.stride, bb.model) == (3, 8, None)
    image = torch.rand(1, 3, 32, 48)
    torch.testing.assert_close(bb(image), F.avg_pool2d(image, 8))
    assert wrap_backbone(fn, fit="resize").output_size(30, 50) == (4, 6)


def test_wrap_rejects_bad_networks():
    with pytest.raises(TypeError, match="nn.Module or callable"):
        wrap_backbone(42)
    with pytest.raises(ValueError, match=r"expected features \(B,C,h,w\)"):
        wrap_backbone(lambda x: x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="feat_dim=5 given"):
        wrap_backbone(TinyNet(), feat_dim=5)
    with pytest.raises(ValueError, match="one integer stride"):
        wrap_backbone(lambda x: F.interpolate(x, size=(10, 40)))
    bb = wrap_backbone(TinyNet(), feat_dim=7, stride=4)  # wrong metadata given: caught at the first call
    with pytest.raises(ValueError, match="expected 7 feature channels, got 6"):
        bb(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        ("not a tensor", TypeError, "expected an image tensor"),
        (torch.rand(3, 32, 32), ValueError, r"expected an RGB image \(B,3,H,W\), got \(3, 32, 32\)"),
        (torch.rand(1, 1, 32, 32), ValueError, r"got \(1, 1, 32, 32\)"),
        (torch.randint(0, 255, (1, 3, 32, 32)), TypeError, "floating-point"),
        (torch.rand(1, 3, 0, 32), ValueError, "non-empty"),
        (torch.rand(1, 3, 32, 32) * 255, ValueError, r"expected RGB values in \[0,1\]"),
    ],
)
def test_bad_inputs(image, error, match):
    bb = _tiny()
    with pytest.raises(error, match=match):
        bb(image)


def test_range_check_can_be_disabled_and_tolerates_resampling_overshoot():
    bb = _tiny(check_range=False)
    bb(torch.rand(1, 3, 16, 16) * 3)
    _tiny()(torch.rand(1, 3, 16, 16) * 1.1 - 0.05)


def test_dtype_follows_the_backbone():
    bb = _tiny()
    assert bb(torch.rand(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float32
    bb64 = _tiny().double()
    assert bb64(torch.rand(1, 3, 16, 16)).dtype == torch.float64


@settings(max_examples=12, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    fit=st.sampled_from(["resize", "pad"]),
)
def test_output_size_predicts_the_grid(height, width, fit):
    bb = _tiny(fit=fit)
    out = bb(torch.rand(1, 3, height, width))
    assert tuple(out.shape[-2:]) == bb.output_size(height, width)
    h, w = out.shape[-2:]
    if fit == "pad":
        assert (h - 1) * 4 < height <= h * 4 and (w - 1) * 4 < width <= w * 4
    else:  # nearest multiple: each cell covers between 2/3 and 2 strides of the image
        assert abs(height - h * 4) <= 2 or h == 1
        assert abs(width - w * 4) <= 2 or w == 1


def test_pad_uses_the_mean_color():
    # pad in normalized space with zeros = the dataset mean: padding an image of the mean color is invisible
    bb = wrap_backbone(nn.Identity(), feat_dim=3, stride=8, mean=IMAGENET_MEAN, std=IMAGENET_STD, fit="pad")
    image = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 13, 21).clone()
    out = bb(image)
    assert out.shape == (1, 3, 16, 24)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)
