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

HEAVY = ("dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vitg14", "dinov2_vitg14_reg")

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


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", [(224, 224), (200, 328)])
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
    # documented rule: resize to the nearest multiple of the stride
    expected = (max(1, math.floor(height / stride + 0.5)), max(1, math.floor(width / stride + 0.5)))
    assert tuple(feats.shape) == (1, feat_dim, *expected)
    assert bb.output_size(height, width) == expected
    assert torch.isfinite(feats).all()


def test_documented_grids():
    # spelled out so a change of the rule cannot go unnoticed: no 224 -> 256 surprise for /14 models
    assert create_backbone("dinov2_vits14", model_kwargs={"depth": 1}).output_size(224, 224) == (16, 16)
    assert create_backbone("dinov2_vits14", model_kwargs={"depth": 1}).output_size(200, 328) == (14, 23)
    assert create_backbone("resnet50").output_size(200, 328) == (6, 10)
    assert create_backbone("dino_vits16", model_kwargs={"depth": 1}).output_size(200, 328) == (13, 21)


@pytest.mark.parametrize(
    ("name", "depth", "prefix"),
    [("dinov2_vitl14", 24, 1), ("dinov2_vitl14_reg", 24, 5), ("dinov2_vitg14", 40, 1), ("dinov2_vitg14_reg", 40, 5)],
)
def test_heavy_models_full_architecture(name, depth, prefix):
    # the full-depth model is built on the meta device: architecture and metadata without 4.5 GB of init
    assert name in HEAVY
    with torch.device("meta"):
        bb = create_backbone(name)
    assert len(bb.model.blocks) == depth and bb.model.num_prefix_tokens == prefix
    assert bb.feat_dim == bb.model.embed_dim == EXPECTED[name][0]
    n_params = sum(p.numel() for p in bb.parameters())
    assert (300e6 < n_params < 310e6) if "vitl" in name else (1.13e9 < n_params < 1.14e9)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="dinov2_vits14"):
        create_backbone("dinov2_vits15")


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="facet"):
        create_backbone("dino_vits16", facet="keys")
    with pytest.raises(ValueError, match="layer"):
        create_backbone("dino_vits16", layer=12)
    with pytest.raises(ValueError, match="stride"):
        create_backbone("dino_vits16", stride=32)
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
            net, feat_dim=config.feat_dim, stride=config.stride, mean=config.mean, std=config.std, fit="resize", **kw
        )

    assert "test_tiny_conv" in list_backbones()
    bb = create_backbone("test_tiny_conv")
    assert bb(torch.rand(1, 3, 30, 50)).shape == (1, 8, 8, 13)  # 30/4=7.5 -> 8, 50/4=12.5 -> 13
    register_backbone(cfg)(build)  # same config and builder again: idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(cfg)(lambda config, **kw: None)
    with pytest.raises(TypeError):
        register_backbone("test_tiny_conv")
