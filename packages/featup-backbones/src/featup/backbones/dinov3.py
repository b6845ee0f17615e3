"""DINOv3 ViTs (S/16, B/16, L/16, LVD-1689M) on timm's ``Eva`` architecture (RoPE, 4 register tokens).

Output: the patch tokens of block ``layer`` (default the last), through the final LayerNorm unless
``final_norm=False``, as a (B, C, H / 16, W / 16) grid; any input size works (RoPE and the token grid follow
the image; sizes that are not a multiple of 16 follow the ``fit`` rule of :class:`featup.backbones.Backbone`).

Weights: ``weights=PATH`` reads a local file offline, either timm's export (``model.safetensors`` of
``timm/vit_*_patch16_dinov3.lvd1689m``) or Meta's original release (``dinov3_vit*16_pretrain_lvd1689m-*.pth``,
converted by timm's ``checkpoint_filter_fn``). ``pretrained=True`` looks in the Hugging Face cache and, offline,
fails at once with the file to fetch (Meta's DINOv3 weights need accepting their licence to download).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featup.backbones.base import Backbone
from featup.backbones.config import BackboneConfig
from featup.backbones.weights import load_strict, select_prefix

__all__ = ["TimmDinoV3Backbone", "build_timm_dinov3"]


class TimmDinoV3Backbone(Backbone):
    """A timm DINOv3 ``Eva`` model under the backbone contract.

    Args:
        model: timm ``vit_*_patch16_dinov3`` built with ``dynamic_img_size=True`` and ``num_classes=0``.
        mean: RGB mean of the training data.
        std: RGB standard deviation of the training data.
        layer: block index (0-based, negative from the end; default -1, the last block).
        final_norm: apply the model's final LayerNorm to the tokens (default True).
        **kwargs: :class:`featup.backbones.Backbone` options (name, use_norm, fit, frozen, check_range).

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, embed_dim, h, w), (h, w) = ``output_size(H, W)``

    Raises:
        ValueError: a layer outside the model, or a model without dynamic image size.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        layer: int = -1,
        final_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise TypeError(f"expected a timm DINOv3 (Eva) model, got {type(model).__name__}")
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError("expected a timm DINOv3 model built with dynamic_img_size=True")
        depth = len(model.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
            raise ValueError(f"expected layer an int in [{-depth}, {depth - 1}], got {layer!r}")
        patch = int(model.patch_embed.patch_size[0])
        super().__init__(feat_dim=int(model.embed_dim), stride=patch, mean=mean, std=std, **kwargs)
        self.model = model
        self.patch_size = patch
        self.layer = layer
        self._index = layer % depth
        self.final_norm = bool(final_norm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``layer`` of a normalized image as a grid.

        Shape:
            - x: (B, 3, H, W), H and W multiples of 16
            - output: (B, embed_dim, H / 16, W / 16)
        """
        out = self.model.forward_intermediates(
            x,
            indices=[self._index],
            norm=self.final_norm,
            output_fmt="NCHW",
            intermediates_only=True,
            stop_early=True,
        )
        return out[0]

    def _natural_output_size(self, height: int, width: int) -> tuple[int, int] | None:
        return height // self.patch_size, width // self.patch_size

    def load_backbone_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load timm's export, Meta's original DINOv3 file, or a Backbone's own state dict (``model.*``)."""
        from timm.models.eva import checkpoint_filter_fn

        state = select_prefix(state, "model.")
        if "storage_tokens" in state:  # Meta's original file: timm renames and converts it
            state = checkpoint_filter_fn(state, self.model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        own = self.model.state_dict()
        # buffers timm recomputes (RoPE periods) may be absent from a file; keep the model's own
        for key in own:
            if key not in state and "rope" in key:
                state[key] = own[key]
        load_strict(self.model, state, self.name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer}, final_norm={self.final_norm}"


def build_timm_dinov3(
    config: BackboneConfig, *, model_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> TimmDinoV3Backbone:
    """Builder registered for DINOv3: timm ``config.architecture`` without weights, any image size.

    Args:
        config: the registry entry.
        model_kwargs: extra arguments of ``timm.create_model`` (e.g. ``depth`` for tests).
        **kwargs: :class:`TimmDinoV3Backbone` options.
    """
    import timm

    margs = {"dynamic_img_size": True, "num_classes": 0, **dict(model_kwargs or {})}
    model = timm.create_model(config.architecture, pretrained=False, **margs)
    kwargs.setdefault("name", config.name)
    return TimmDinoV3Backbone(model, mean=config.mean, std=config.std, **kwargs)
