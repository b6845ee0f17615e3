"""Every registered name: builds offline with pretrained=False, documented metadata and output shapes."""

from __future__ import annotations

import math

import pytest
import torch

from featup.backbones import (
    CLIP_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ORIGINAL_HUB_NAMES,
    Backbone,
    BackboneConfig,
    create_backbone,
    get_backbone_config,
    list_backbones,
    register_backbone,
    wrap_backbone,
)

SIZES = [(224, 224), (200, 328)]
SHALLOW = {"depth": 2}
#: real arithmetic on small odd sizes (the 224 / 200x328 shapes at full depth are checked on the meta device)
NUMERIC_SIZES = [(45, 61)]
#: name -> (depth, prefix tokens, parameter count bounds)
ARCH = {
    "dinov2_vits14": (12, 1, 21e6, 23e6),
    "dinov2_vitl14": (24, 1, 300e6, 310e6),
    "dinov2_vitl14_reg": (24, 5, 300e6, 310e6),
    "dinov2_vitg14": (40, 1, 1.13e9, 1.14e9),
    "dinov2_vitg14_reg": (40, 5, 1.13e9, 1.14e9),
    "clip_vitb16": (12, 1, 85e6, 87e6),
}

#: the documented table: name -> (feat_dim, stride, patch size)
EXPECTED = {
    "dino_vits16": (384, 16, 16),
    "dino_vits8": (384, 8, 8),
    "dino_vitb16": (768, 16, 16),
    "dinov2_vits14": (384, 14, 14),
    "dinov2_vitb14": (768, 14, 14),
    "dinov2_vitl14": (1024, 14, 14),
    "dinov2_vitg14": (1536, 14, 14),
    "dinov2_vits14_reg": (384, 14, 14),
    "dinov2_vitb14_reg": (768, 14, 14),
    "dinov2_vitl14_reg": (1024, 14, 14),
    "dinov2_vitg14_reg": (1536, 14, 14),
    "clip_vitb16": (512, 16, 16),
    "maskclip_vitb16": (512, 16, 16),
    "vit_small_patch16_224": (384, 16, 16),
    "resnet50": (2048, 32, None),
    "deeplabv3_resnet50": (2048, 8, None),
    "efficientnet_lite0": (112, 16, None),
    "dinov3_vits16": (384, 16, 16),
    "dinov3_vitb16": (768, 16, 16),
    "dinov3_vitl16": (1024, 16, 16),
}


def test_list_backbones_is_the_documented_set():
    assert [n for n in list_backbones() if not n.startswith("test_")] == sorted(EXPECTED)
    assert list_backbones("dinov2*_reg") == [
        "dinov2_vitb14_reg",
        "dinov2_vitg14_reg",
        "dinov2_vitl14_reg",
        "dinov2_vits14_reg",
    ]
    assert set(ORIGINAL_HUB_NAMES.values()) <= set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_metadata(name):
    cfg = get_backbone_config(name)
    feat_dim, stride, patch = EXPECTED[name]
    assert (cfg.feat_dim, cfg.stride, cfg.patch_size) == (feat_dim, stride, patch)
    assert cfg.weights is not None and cfg.weights.download_url.startswith("https://")
    expected_mean = CLIP_MEAN if "clip" in name else (0.5,) * 3 if name.startswith("vit_") else IMAGENET_MEAN
    assert cfg.mean == expected_mean


def _expected_grid(height, width, stride):
    # documented rule: resize to the nearest multiple of the stride, at least one cell
    return max(1, math.floor(height / stride + 0.5)), max(1, math.floor(width / stride + 0.5))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_architecture_on_meta_device(name):
    # every name at full depth (giant included) builds with pretrained=False; shapes propagate on the meta
    # device, which runs the real code path without 4.5 GB of initialization or any arithmetic
    with torch.device("meta"):
        bb = create_backbone(name, check_range=False)
        outs = [bb(torch.rand(1, 3, h, w)) for h, w in SIZES]
    feat_dim, stride, patch = EXPECTED[name]
    assert (bb.feat_dim, bb.stride, getattr(bb, "patch_size", None)) == (feat_dim, stride, patch)
    for (h, w), out in zip(SIZES, outs):
        assert tuple(out.shape) == (1, feat_dim, *_expected_grid(h, w, stride))
    if name in ARCH:
        depth, prefix, lo, hi = ARCH[name]
        assert len(bb.model.blocks) == depth and bb.model.num_prefix_tokens == prefix
        assert lo < sum(p.numel() for p in bb.parameters()) < hi


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", NUMERIC_SIZES)
def test_shape_and_metadata(built, name, size):
    bb = built(name)
    feat_dim, stride, _ = EXPECTED[name]
    assert isinstance(bb, Backbone)
    assert (bb.feat_dim, bb.stride) == (feat_dim, stride)
    assert bb.mean == get_backbone_config(name).mean and bb.std == get_backbone_config(name).std
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    height, width = size
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, height, width))
    expected = _expected_grid(height, width, stride)
    assert tuple(feats.shape) == (1, feat_dim, *expected)
    assert bb.output_size(height, width) == expected
    assert torch.isfinite(feats).all()


def test_real_forward_at_the_documented_sizes(built):
    # the meta-device shapes are backed by real arithmetic at full size for two models (two blocks)
    for name in ("dino_vits16", "dinov2_vits14_reg"):
        bb = built(name)
        for h, w in SIZES:
            with torch.no_grad():
                out = bb(torch.rand(1, 3, h, w))
            assert tuple(out.shape) == (1, bb.feat_dim, *_expected_grid(h, w, bb.stride))
            assert torch.isfinite(out).all()


def test_documented_grids():
    # spelled out so a change of the rule cannot go unnoticed: no 224 -> 256 surprise for /14 models
    with torch.device("meta"):
        v2 = create_backbone("dinov2_vits14")
        assert v2.output_size(224, 224) == (16, 16) and v2.output_size(200, 328) == (14, 23)
        assert create_backbone("resnet50").output_size(200, 328) == (6, 10)
        assert create_backbone("dino_vits16").output_size(200, 328) == (13, 21)
        assert create_backbone("resnet50", fit="pad").output_size(200, 328) == (7, 11)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="dinov2_vits14"):
        create_backbone("dinov2_vits15")


def test_bad_options_are_rejected():
    with torch.device("meta"):  # validation only: skip initializing weights
        with pytest.raises(ValueError, match="facet"):
            create_backbone("dino_vits16", facet="keys")
        with pytest.raises(ValueError, match="layer"):
            create_backbone("dino_vits16", layer=12)
        with pytest.raises(ValueError, match="stride"):
            create_backbone("dino_vits16", stride=32)
        with pytest.raises(ValueError, match="stride"):
            create_backbone("dino_vits16", stride=0)
        with pytest.raises(ValueError, match="fit"):
            create_backbone("resnet50", fit="crop")
        with pytest.raises(ValueError, match="project"):
            create_backbone("dino_vits16", project=True)
        with pytest.raises(ValueError, match="layer"):
            create_backbone("resnet50", layer=5)


def test_register_custom_backbone():
    cfg = BackboneConfig(
        name="test_tiny_conv", architecture="conv", feat_dim=8, stride=4, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )

    @register_backbone(cfg)
    def build(config, **kw):
        net = torch.nn.Conv2d(3, config.feat_dim, kernel_size=4, stride=4)
        return wrap_backbone(
            net,
            feat_dim=config.feat_dim,
            stride=config.stride,
            mean=config.mean,
            std=config.std,
            fit="resize",
            **kw,
        )

    assert "test_tiny_conv" in list_backbones()
    bb = create_backbone("test_tiny_conv")
    assert bb(torch.rand(1, 3, 30, 50)).shape == (1, 8, 8, 13)  # 30/4=7.5 -> 8, 50/4=12.5 -> 13
    register_backbone(cfg)(build)  # same config and builder again: idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(cfg)(lambda config, **kw: None)
    with pytest.raises(TypeError):
        register_backbone("test_tiny_conv")


def test_import_does_not_pull_in_core_or_timm():
    # dependency direction: backbones never imports featup.core; timm loads only when a ViT is built
    import subprocess
    import sys

    code = (
        "import sys, featup.backbones; "
        "bad = [m for m in ('featup.core', 'timm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
