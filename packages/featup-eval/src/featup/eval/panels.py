"""Figures: rows of labelled tiles (image, PCA of features, heatmaps), as the paper shows them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from featup.eval.images import to_uint8

__all__ = ["feature_panel", "heatmap_rgb", "mark_point", "tile_row"]

_TITLE_H = 14


def _fit(rgb: torch.Tensor, size: tuple[int, int], nearest: bool) -> torch.Tensor:
    """Resize a (1|3, h, w) tile to ``size`` for display (nearest keeps low-res cells visible)."""
    x = rgb[None].float()
    mode = "nearest" if nearest else "bilinear"
    return F.interpolate(x, size=size, mode=mode, **({} if nearest else {"align_corners": False}))[0]


def tile_row(
    tiles: Sequence[tuple[str, torch.Tensor]], tile_size: Sequence[int] | None = None
) -> Image.Image:
    """One row of titled tiles; low-res tiles are enlarged with nearest neighbours.

    Args:
        tiles: (title, rgb) pairs; rgb (3, h, w) or (1, 3, h, w) in [0, 1].
        tile_size: (H, W) of each tile; default the largest tile's size.
    """
    rgbs = [(t, r[0] if r.dim() == 4 else r) for t, r in tiles]
    if tile_size is None:
        tile_size = max((tuple(r.shape[-2:]) for _, r in rgbs), key=lambda s: s[0] * s[1])
    th, tw = (int(s) for s in tile_size)
    # titles need some width; small tiles are enlarged for display
    scale = max(1, int(np.ceil(96 / min(th, tw))))
    th, tw = th * scale, tw * scale
    gap = 4
    canvas = Image.new("RGB", (len(rgbs) * (tw + gap) - gap, th + _TITLE_H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, rgb) in enumerate(rgbs):
        small = rgb.shape[-1] < tw and rgb.shape[-2] < th
        tile = to_uint8(_fit(rgb.detach().cpu(), (th, tw), nearest=small and rgb.shape[-1] * 4 <= tw))
        x0 = i * (tw + gap)
        canvas.paste(Image.fromarray(tile), (x0, _TITLE_H))
        draw.text((x0 + 2, 1), title[: max(4, tw // 6)], fill="black")
    return canvas


def feature_panel(
    image: torch.Tensor, lr_feats: torch.Tensor, hr: Sequence[tuple[str, torch.Tensor]]
) -> Image.Image:
    """Image | low-res PCA | each high-res map's PCA (PCA fitted on low-res features, as in the paper).

    Shape:
        - image: (1, 3, H, W); lr_feats: (1, C, h, w); hr[i][1]: (1, C, H_i, W_i)
    """
    from featup.core.visualize import pca_rgb

    rgbs = pca_rgb(lr_feats.float(), *(f.float() for _, f in hr))
    tiles = [("image", image[0]), ("low-res", rgbs[0][0])]
    tiles += [(name, rgb[0]) for (name, _), rgb in zip(hr, rgbs[1:])]
    return tile_row(tiles, tuple(image.shape[-2:]))


def heatmap_rgb(sim: torch.Tensor, vmin: float = -1.0, vmax: float = 1.0) -> torch.Tensor:
    """A similarity map (H, W) as RGB (3, H, W): blue dissimilar, red similar (matplotlib 'coolwarm')."""
    from matplotlib import colormaps

    x = ((sim.detach().float().cpu() - vmin) / (vmax - vmin)).clamp(0, 1).numpy()
    rgb = colormaps["coolwarm"](x)[..., :3]
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)


def mark_point(rgb: torch.Tensor, x: float, y: float, radius: int = 3) -> torch.Tensor:
    """A copy of ``rgb`` (3, H, W) with a red cross at pixel (x, y)."""
    out = rgb.clone()
    h, w = out.shape[-2:]
    xi, yi = int(round(x)), int(round(y))
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    for d in range(-radius, radius + 1):
        for yy, xx in ((yi + d, xi + d), (yi + d, xi - d)):
            if 0 <= yy < h and 0 <= xx < w:
                out[:, yy, xx] = red[:, 0]
    return out
