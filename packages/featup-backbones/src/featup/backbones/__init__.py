"""featup.backbones: one contract for every vision backbone FeatUp upsamples.

>>> from featup.backbones import create_backbone, list_backbones
>>> bb = create_backbone("dinov2_vits14", pretrained=True)   # or weights="path/to/file.safetensors"
>>> feats = bb(image)                # image RGB in [0,1], (B,3,H,W) -> (B, bb.feat_dim, h, w)
>>> bb.feat_dim, bb.stride, bb.mean, bb.std, bb.output_size(H, W)

See :mod:`featup.backbones.base` for the contract (normalization inside, size fitting, frozen eval mode,
``use_norm``), :mod:`featup.backbones.vit` for ViT facets, layers and the Strided baseline, and
:mod:`featup.backbones.weights` for offline behavior.
"""

from __future__ import annotations

from featup.backbones import models as _models  # noqa: F401  (registers the built-in backbones)
from featup.backbones.base import FIT_MODES, Backbone, FitMode, channel_norm, check_image
from featup.backbones.config import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneConfig,
    WeightsSource,
)
from featup.backbones.models import ORIGINAL_HUB_NAMES
from featup.backbones.registry import create_backbone, get_backbone_config, list_backbones, register_backbone
from featup.backbones.resnet import TorchvisionResNetBackbone
from featup.backbones.vit import VIT_FACETS, TimmViTBackbone
from featup.backbones.weights import (
    WeightsUnavailableError,
    read_state_dict,
    resolve_pretrained,
)
from featup.backbones.wrap import WrappedBackbone, wrap_backbone

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FIT_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ORIGINAL_HUB_NAMES",
    "VIT_FACETS",
    "Backbone",
    "BackboneConfig",
    "FitMode",
    "TimmViTBackbone",
    "TorchvisionResNetBackbone",
    "WeightsSource",
    "WeightsUnavailableError",
    "WrappedBackbone",
    "channel_norm",
    "check_image",
    "create_backbone",
    "get_backbone_config",
    "list_backbones",
    "read_state_dict",
    "register_backbone",
    "resolve_pretrained",
    "wrap_backbone",
]
