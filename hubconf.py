"""torch.hub entry points with the original FeatUp project's names: ``torch.hub.load(REPO, "dino16")``.

Each returns :class:`featup.eval.pretrained.PretrainedFeatUp` in eval mode: ``model(image)`` gives the
upsampled features, ``model.model(image)`` the backbone's, and ``model.upsampler`` is the JBU. Images are
RGB in [0, 1] (the original models took ImageNet-normalized images; normalization now happens inside).
The FeatUp packages must be installed (``pip install featup-eval``), since the JBU runs on the compiled
``featup-kernels`` op; from a source checkout the pure-Python packages are found under ``packages/``.

Offline, pass local files: ``torch.hub.load(REPO, "dino16", checkpoint="dino16_jbu_stack_cocostuff.ckpt",
weights="dino_deitsmall16_pretrain.pth")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "timm", "safetensors"]

try:
    import featup.eval.pretrained  # noqa: F401
except ImportError:  # a source checkout (torch.hub clones the repository): use the packages' src folders
    _root = Path(__file__).resolve().parent
    for _pkg in ("featup-eval", "featup-backbones", "featup-core", "featup-kernels"):
        _src = _root / "packages" / _pkg / "src"
        if _src.is_dir() and str(_src) not in sys.path:
            sys.path.append(str(_src))

from featup.eval.pretrained import load_pretrained  # noqa: E402


def vit(pretrained: bool = True, use_norm: bool = True, **kwargs):
    """Supervised ViT-S/16 + its JBU stack (384 channels, stride 16)."""
    return load_pretrained("vit", use_norm=use_norm, pretrained=pretrained, **kwargs)


def dino16(pretrained: bool = True, use_norm: bool = True, **kwargs):
    """DINO ViT-S/16 + its JBU stack (384 channels, stride 16)."""
    return load_pretrained("dino16", use_norm=use_norm, pretrained=pretrained, **kwargs)


def clip(pretrained: bool = True, use_norm: bool = True, **kwargs):
    """CLIP ViT-B/16 + its JBU stack (512 channels, stride 16)."""
    return load_pretrained("clip", use_norm=use_norm, pretrained=pretrained, **kwargs)


def dinov2(pretrained: bool = True, use_norm: bool = True, **kwargs):
    """DINOv2 ViT-S/14 + its JBU stack (384 channels, stride 14)."""
    return load_pretrained("dinov2", use_norm=use_norm, pretrained=pretrained, **kwargs)


def resnet50(pretrained: bool = True, use_norm: bool = True, **kwargs):
    """ResNet-50 layer4 + its JBU stack (2048 channels, stride 32)."""
    return load_pretrained("resnet50", use_norm=use_norm, pretrained=pretrained, **kwargs)


def maskclip(pretrained: bool = True, use_norm: bool = False, **kwargs):
    """MaskCLIP (CLIP ViT-B/16 value path) + its JBU stack; published without use_norm only."""
    return load_pretrained("maskclip", use_norm=use_norm, pretrained=pretrained, **kwargs)
