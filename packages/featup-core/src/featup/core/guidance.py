"""The JBU stack's guidance encoder: texture-aware guidance features computed once at full resolution.

The paper's range kernel sees each stage's guidance through a per-pixel (1x1) MLP on the image pooled to the
stage's size, so it can only compare colours. Where an object differs from its surroundings by texture
rather than colour, or is striped in colours that also occur outside it, those keys cannot tell the two sides
of the boundary apart. A small convolutional encoder run on the full-resolution image sees a few pixels of
neighbourhood; each stage pools its output instead of the raw image.

The 3x3 weights are mirror-symmetric left to right, so the encoder, and with it the whole stack, stays
equivariant to horizontal flips (one of the paper's training jitters) like the paper's 1x1 MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GuidanceEncoder", "MirrorConv2d"]


class MirrorConv2d(nn.Conv2d):
    """A convolution whose kernel is symmetric under a left-right flip, with edge padding ("same" size).

    The stored ``weight`` is free; the applied kernel is ``(weight + weight.flip(-1)) / 2``. Padding reflects
    (replicates on maps too small to reflect), which also commutes with a flip.

    Shape:
        - input: (B, in_channels, H, W)
        - output: (B, out_channels, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"expected an odd kernel_size, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.kernel_size[0] // 2
        if r:
            mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
            x = F.pad(x, [r] * 4, mode=mode)
        weight = 0.5 * (self.weight + self.weight.flip(-1))
        return F.conv2d(x, weight, self.bias)


class GuidanceEncoder(nn.Sequential):
    """Two mirror-symmetric 3x3 convolutions and a 1x1 projection with GELUs: a 5x5 px receptive field.

    Args:
        in_channels: guidance channels (3 for RGB).
        dim: width of the hidden and output features.

    Shape:
        - input: (B, in_channels, H, W)
        - output: (B, dim, H, W)
    """

    def __init__(self, in_channels: int = 3, dim: int = 32) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"expected dim as a positive int, got {dim!r}")
        super().__init__(
            MirrorConv2d(in_channels, dim, 3),
            nn.GELU(),
            MirrorConv2d(dim, dim, 3),
            nn.GELU(),
            nn.Conv2d(dim, dim, 1),
        )
        self.dim = dim

    #: how far the encoder looks beyond a pixel, in full-resolution pixels (two 3x3 layers)
    reach = 2
