"""The one call every upsampler shares: ``up(lr_feats, image, output_size=None) -> (B, C, H, W)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featup.core._checks import check_features, check_image, resolve_size

__all__ = ["Upsampler"]


class Upsampler(nn.Module):
    """Base class: validates the inputs once, resolves the output size, then calls ``upsample``.

    Subclasses implement ``upsample(lr_feats, image, size)`` with validated arguments and an exact
    ``(H, W)`` size, and ``config()`` returning the JSON-serialisable constructor arguments.

    Shape:
        - lr_feats: (B, C, h, w)
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, C, H', W') with (H', W') = ``output_size`` or the image size
    """

    #: whether ``upsample`` reads the guidance image (unguided upsamplers accept ``image=None``)
    guided: bool = True

    def forward(
        self,
        lr_feats: torch.Tensor,
        image: torch.Tensor | None = None,
        output_size: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        check_features(lr_feats, "lr_feats")
        if image is not None or self.guided:
            if image is None:
                raise ValueError(f"{type(self).__name__} is guided: expected image (B,3,H,W), got None")
            check_image(image, lr_feats)
        size = resolve_size(output_size, image)
        out = self.upsample(lr_feats, image, size)
        return out

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement upsample()")

    def config(self) -> dict:
        """Constructor arguments as a JSON-serialisable dict (used by checkpoints and ``__repr__``)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())
