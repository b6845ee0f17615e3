"""Vision Transformers from timm (DINO, DINOv2 with/without registers, CLIP, MaskCLIP, supervised ViT).

Options of :class:`TimmViTBackbone` (all accepted by ``create_backbone``):

- ``facet``: what is read from block ``layer``:

  - ``"token"``: the block's output tokens (by default through the model's final LayerNorm, as DINO's
    ``get_intermediate_layers(norm=True)`` and DINOv2's ``x_norm_patchtokens``);
  - ``"query"`` / ``"key"`` / ``"value"``: the attention projections of the block's (pre-normed) input,
    heads concatenated (C = embed dim); never normed or projected;
  - ``"value_path"``: MaskCLIP (Zhou et al., 2022). The block is evaluated with its attention matrix replaced
    by the identity, i.e. each token attends only to itself, so the attention output is the value projection:
    ``y = x + proj(v(norm1(x)))``, ``y = y + mlp(norm2(y))`` (layer scales included when present), followed by
    the final LayerNorm and, for CLIP, the image-text projection. On the last block of CLIP this gives dense
    features that live in CLIP's joint embedding space (512 channels for ViT-B/16).

- ``layer``: block index, 0-based, negative from the end (default -1: the last block). Only the blocks up to
  ``layer`` run.
- ``final_norm``: the final LayerNorm on ``token`` / ``value_path`` features of any layer (default True).
- ``project``: apply CLIP's image-text projection (``model.head``) to ``token`` / ``value_path`` features
  (default: True for the CLIP models, 512 channels, as the original project's CLIP featurizers; False gives
  the 768-channel tokens).
- ``stride``: the paper's *Strided* baseline (supplement section 6.2): the patch-embedding convolution keeps
  its ``patch_size`` kernel but moves by ``stride`` < ``patch_size`` pixels, giving ``patch_size / stride``
  times denser features; positional embeddings are interpolated to the denser grid. The (normalized, fitted)
  image is edge-padded by ``patch_size - stride`` pixels split over both sides, so the grid is exactly
  ``H / stride`` x ``W / stride`` and cell i is centred on pixels [i * stride, (i + 1) * stride). Cost grows
  with ``(patch_size / stride) ** 4``.

Any input size works: positional embeddings are resampled (bicubic, timm ``dynamic_img_size``) to the token
grid of each call. Sizes that are not a multiple of the stride follow the ``fit`` rule of
:class:`featup.backbones.Backbone` (resize to the nearest multiple by default), so a 224 x 224 image gives
16 x 16 DINOv2 features (224 / 14), never a silent 256 px output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featup.backbones.base import Backbone
from featup.backbones.config import BackboneConfig
from featup.backbones.weights import load_strict, select_prefix

__all__ = ["VIT_FACETS", "TimmViTBackbone", "build_timm_vit"]

VIT_FACETS: tuple[str, ...] = ("token", "query", "key", "value", "value_path")
_QKV_INDEX = {"query": 0, "key": 1, "value": 2}


def _split_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (B, N, C) -> three (B, N, heads * head_dim), heads concatenated as timm's attention output
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return tuple(t.transpose(1, 2).reshape(b, n, -1) for t in (q, k, v))  # type: ignore[return-value]


class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` under the backbone contract; see the module docstring for the options.

    Args:
        model: timm ``VisionTransformer`` built with ``dynamic_img_size=True``.
        mean: RGB mean of the model's training data.
        std: RGB standard deviation of the model's training data.
        facet: ``"token"``, ``"query"``, ``"key"``, ``"value"`` or ``"value_path"``.
        layer: block index (0-based, negative from the end).
        final_norm: final LayerNorm on ``token`` / ``value_path`` features.
        project: apply ``model.head`` (CLIP's projection) to ``token`` / ``value_path`` features; ``None``:
            whenever the model has a linear head.
        stride: patch-embedding stride (default the patch size; smaller for the Strided baseline).
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
        facet: str = "token",
        layer: int = -1,
        final_norm: bool = True,
        project: bool | None = None,
        stride: int | None = None,
        **kwargs: Any,
    ) -> None:
        for attr in ("patch_embed", "blocks", "norm", "head", "_pos_embed", "num_prefix_tokens"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"expected a timm VisionTransformer, got {type(model).__name__} without {attr!r}"
                )
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError("expected a timm VisionTransformer built with dynamic_img_size=True")
        if facet not in VIT_FACETS:
            raise ValueError(f"expected facet in {VIT_FACETS}, got {facet!r}")
        patch = model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"expected a square patch size, got {tuple(patch)}")
        patch_size = int(patch[0])
        stride = patch_size if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= patch_size:
            raise ValueError(f"expected stride an int in [1, {patch_size}] (the patch size), got {stride!r}")
        depth = len(model.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
            raise ValueError(
                f"expected layer an int in [{-depth}, {depth - 1}] ({depth} blocks), got {layer!r}"
            )
        has_head = isinstance(model.head, nn.Linear)
        projectable = facet in ("token", "value_path")
        if project is None:
            project = has_head and projectable
        if project and not (has_head and projectable):
            raise ValueError(
                f"project=True needs a linear head and facet 'token' or 'value_path', "
                f"got head {type(model.head).__name__} and facet {facet!r}"
            )
        block = model.blocks[layer]
        if facet != "token":
            for attr in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"):
                if not hasattr(block, attr):
                    raise TypeError(
                        f"facet {facet!r} needs a pre-norm timm Block, got {type(block).__name__}"
                    )
            if not hasattr(block.attn, "qkv"):
                raise TypeError(
                    f"facet {facet!r} needs a fused qkv projection in {type(block.attn).__name__}"
                )
        if project:
            feat_dim = model.head.out_features
        elif projectable:
            feat_dim = model.embed_dim
        else:
            feat_dim = block.attn.num_heads * block.attn.head_dim
        super().__init__(feat_dim=feat_dim, stride=stride, mean=mean, std=std, **kwargs)
        self.model = model
        self.patch_size = patch_size
        self.facet = facet
        self.layer = layer
        self.layer_index = layer % depth
        self.final_norm = bool(final_norm)
        self.project = bool(project)
        if stride != patch_size:
            # Strided baseline: same kernel, denser sampling; forward_features pads so the grid is H/stride
            model.patch_embed.proj.stride = (stride, stride)

    def _natural_output_size(self, height: int, width: int) -> tuple[int, int] | None:
        if height % self.stride or width % self.stride:
            return None
        return height // self.stride, width // self.stride

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a normalized image whose sides are multiples of the stride.

        Shape:
            - x: (B, 3, H, W), H and W multiples of ``stride``
            - output: (B, feat_dim, H / stride, W / stride)
        """
        height, width = x.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"{self.name}: expected height and width multiples of the stride {self.stride} with "
                f"fit='none', "
                f"got {height}x{width}; use fit='resize' or fit='pad'"
            )
        m = self.model
        extra = self.patch_size - self.stride
        if extra:
            lo = extra // 2
            x = F.pad(x, (lo, extra - lo, lo, extra - lo), mode="replicate")
        # the patch embedding is called piecewise: timm's PatchEmbed asserts sizes a strided conv violates
        x = m.patch_embed.proj(x)
        b, _, h, w = x.shape
        x = m.patch_embed.norm(x.permute(0, 2, 3, 1))  # (B, h, w, C) as dynamic_img_size expects
        x = m._pos_embed(x)  # resamples the positional embeddings to (h, w)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        for blk in m.blocks[: self.layer_index]:
            x = blk(x)
        blk = m.blocks[self.layer_index]
        if self.facet == "token":
            tokens = blk(x)
        elif self.facet == "value_path":
            tokens = self._value_path(blk, x)
        else:
            tokens = _split_qkv(blk.attn, blk.norm1(x))[_QKV_INDEX[self.facet]]
        if self.facet in ("token", "value_path"):
            if self.final_norm:
                tokens = m.norm(tokens)
            if self.project:
                tokens = m.head(tokens)
        tokens = tokens[:, m.num_prefix_tokens :]
        return tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    @staticmethod
    def _value_path(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # MaskCLIP: attention with the identity as attention matrix, so the attention output is proj(v)
        attn = blk.attn
        y = blk.norm1(x)
        v = attn.norm(_split_qkv(attn, y)[2])
        if getattr(attn, "gate", None) is not None:
            v = v * attn.gate(y).sigmoid()
        x = x + blk.ls1(attn.proj(v))
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

    def load_backbone_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load timm-format weights or the authors' DINO/DINOv2 and OpenCLIP formats (timm converts them).

        A ``backbone.``-prefixed checkpoint (DINO training checkpoints) is unprefixed; classifier head weights
        are dropped when the adapter has no head.
        """
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = select_prefix(state, "backbone.")
        state = select_prefix(state, "model.")  # a Backbone's own state_dict()
        state = checkpoint_filter_fn(state, self.model)
        if not isinstance(self.model.head, nn.Linear):
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        load_strict(self.model, state, self.name)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, patch_size={self.patch_size}, facet={self.facet!r}, "
            f"layer={self.layer}, "
            f"final_norm={self.final_norm}, project={self.project}"
        )


def build_timm_vit(
    config: BackboneConfig,
    *,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TimmViTBackbone:
    """Builder registered for the timm ViTs: instantiates ``config.architecture`` without weights.

    Args:
        config: the registry entry.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 2}`` for a shallow test model).
        **kwargs: :class:`TimmViTBackbone` options.
    """
    import timm

    margs: dict[str, Any] = {"num_classes": 0, **(model_kwargs or {})}
    margs["dynamic_img_size"] = True
    model = timm.create_model(config.architecture, pretrained=False, **margs)
    kwargs.setdefault("name", config.name)
    return TimmViTBackbone(model, mean=config.mean, std=config.std, **kwargs)
