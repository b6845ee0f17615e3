"""torchvision ResNets: ResNet-50 (layer4, stride 32) and the DeepLabV3-ResNet50 backbone (dilated, stride 8).

``layer`` selects the residual stage whose output is returned: 1..4 or -1..-4 (-1 = ``layer4``, the default).
Strides per stage are 4, 8, 16, 32 for the plain ResNet and 4, 8, 8, 8 for DeepLabV3's dilated backbone
(``replace_stride_with_dilation=[False, True, True]``). The classifier (``fc``) and pooling are removed;
DeepLabV3's segmentation heads are not part of the backbone (its weights file is read under ``backbone.``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from featup.backbones.base import Backbone
from featup.backbones.config import BackboneConfig
from featup.backbones.weights import load_strict, select_prefix

__all__ = ["TorchvisionResNetBackbone", "build_torchvision_resnet"]


def _stage_channels(stage: nn.Module) -> int:
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    return norms[-1].num_features


class TorchvisionResNetBackbone(Backbone):
    """A torchvision ``ResNet`` truncated after one residual stage, under the backbone contract.

    Args:
        model: torchvision ``ResNet`` (its ``fc`` and ``avgpool`` are replaced by identities).
        mean: RGB mean of the training data.
        std: RGB standard deviation of the training data.
        dilation: torchvision's ``replace_stride_with_dilation`` the model was built with.
        layer: stage 1..4 or -1..-4 (-1 = ``layer4``).
        **kwargs: :class:`featup.backbones.Backbone` options (name, use_norm, fit, frozen, check_range).

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, feat_dim, h, w), (h, w) = ``output_size(H, W)``
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        dilation: Sequence[bool] = (False, False, False),
        layer: int = -1,
        **kwargs: Any,
    ) -> None:
        for attr in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            if not hasattr(model, attr):
                raise TypeError(f"expected a torchvision ResNet, got {type(model).__name__} without {attr!r}")
        if len(dilation) != 3:
            raise ValueError(f"expected 3 dilation flags (layer2..layer4), got {tuple(dilation)}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer == 0 or not -4 <= layer <= 4:
            raise ValueError(f"expected layer in 1..4 or -1..-4, got {layer!r}")
        stage = layer if layer > 0 else 5 + layer
        stride = 4
        for k in range(2, stage + 1):
            stride *= 1 if dilation[k - 2] else 2
        feat_dim = _stage_channels(getattr(model, f"layer{stage}"))
        super().__init__(feat_dim=feat_dim, stride=stride, mean=mean, std=std, **kwargs)
        model.fc = nn.Identity()
        model.avgpool = nn.Identity()
        self.model = model
        self.layer = layer
        self.stage = stage
        self.dilation = tuple(bool(d) for d in dilation)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage output of a normalized image.

        Shape:
            - x: (B, 3, H, W)
            - output: (B, feat_dim, H / stride, W / stride) for H, W multiples of the stride
        """
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for k in range(1, self.stage + 1):
            x = getattr(m, f"layer{k}")(x)
        return x

    def _natural_output_size(self, height: int, width: int) -> tuple[int, int] | None:
        # conv1 (stride 2, pad 3, kernel 7), maxpool and each strided 3x3 stage all map n -> ceil(n / 2)
        halvings = 2 + sum(1 for k in range(2, self.stage + 1) if not self.dilation[k - 2])
        h, w = height, width
        for _ in range(halvings):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def load_backbone_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision ResNet or DeepLabV3 (``backbone.*``) weights, or a Backbone's own state dict."""
        state = select_prefix(state, "backbone.")
        state = select_prefix(state, "model.")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_strict(self.model, state, self.name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, dilation={self.dilation}"


def build_torchvision_resnet(
    config: BackboneConfig,
    *,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TorchvisionResNetBackbone:
    """Builder registered for the torchvision ResNets: ``config.architecture`` without weights.

    Args:
        config: the registry entry.
        model_kwargs: extra arguments of the torchvision constructor (``replace_stride_with_dilation``, ...).
        **kwargs: :class:`TorchvisionResNetBackbone` options.
    """
    import torchvision

    margs: dict[str, Any] = dict(model_kwargs or {})
    dilation = tuple(margs.setdefault("replace_stride_with_dilation", [False, False, False]))
    model = getattr(torchvision.models, config.architecture)(weights=None, **margs)
    kwargs.setdefault("name", config.name)
    return TorchvisionResNetBackbone(model, mean=config.mean, std=config.std, dilation=dilation, **kwargs)
