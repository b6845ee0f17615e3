"""Bounded-memory inference: run any upsampler over overlapping tiles of a large output.

A guided upsampler such as the JBU stack is local: every output pixel depends only on low-resolution features
and guidance pixels within a few low-resolution cells around it. ``tiled_upsample`` therefore cuts the output
into core tiles, runs the upsampler on each core plus a halo of context (low-res features, guidance image and
output all cropped to the same region), and keeps only the core of each result. Peak working memory is that of
one ``tile + 2 * halo`` call, whatever the output size; only the result itself (or the caller's ``out``
buffer, which may be a memory map) grows with the output.

Why the tiled result equals the untiled one: every crop boundary lies on a grid on which low-res cells, image
pixels and output pixels coincide (the *alignment unit*), so each crop has exactly the full map's scale
ratios and its resizes, pools and adaptive convolutions sample the same positions as the full computation.
Only pixels within the receptive field of a crop edge (where padding replaces real neighbours) differ, and
the halo is wider than that receptive field, so cropping the core discards them. At the image border a
crop's edge is the image's edge, so the padding is the same as untiled.

The JBU stack's receptive field, in low-res cells: each 2x stage resamples its source bicubically (2 source
pixels each side) and applies a 7x7 adaptive kernel (3 pixels at its own resolution), and the range kernel
compares guidance within the same 7x7 window. Over four stages that is (2 + 1 + 1/2 + 1/4) + (3/2 + 3/4 +
3/8 + 3/16) < 7 cells with bicubic resampling (< 5 with bilinear); the range kernel's keys come from the
same window. :func:`halo_for` derives the halo from a stack's ``radius`` and ``resize_mode``; other
upsamplers get ``DEFAULT_HALO_CELLS = 8`` cells, or say what they need with a ``tile_halo`` attribute (in
low-res cells); ``overlap`` overrides both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featup.core._checks import check_features, check_image, resolve_size
from featup.core.consistency import back_project

__all__ = ["DEFAULT_HALO_CELLS", "Tile", "alignment_unit", "halo_for", "plan_tiles", "tiled_upsample"]

#: default context on each side of a tile, in low-resolution feature cells (covers the 4-stage JBU stack)
DEFAULT_HALO_CELLS = 8


@dataclass(frozen=True)
class Tile:
    """One tile of a plan; all ranges are half-open ``(start, stop)``.

    Attributes:
        core_lr: rows/cols of low-res cells whose output this tile produces, as ((y0, y1), (x0, x1)).
        crop_lr: core_lr plus the halo, clipped to the feature map: what the upsampler is given.
        crop_image: the guidance pixels matching ``crop_lr`` (None without a guidance image).
        crop_out: the output pixels the upsampler produces for ``crop_lr``.
        core_out: the output pixels kept from this tile (they partition the output exactly).
    """

    core_lr: tuple[tuple[int, int], tuple[int, int]]
    crop_lr: tuple[tuple[int, int], tuple[int, int]]
    crop_image: tuple[tuple[int, int], tuple[int, int]] | None
    crop_out: tuple[tuple[int, int], tuple[int, int]]
    core_out: tuple[tuple[int, int], tuple[int, int]]

    @property
    def crop_out_size(self) -> tuple[int, int]:
        """(H, W) of the upsampler call for this tile."""
        (y0, y1), (x0, x1) = self.crop_out
        return y1 - y0, x1 - x0

    @property
    def core_slice(self) -> tuple[slice, slice]:
        """Where the kept core lies inside the upsampler's output for this tile."""
        (cy0, cy1), (cx0, cx1) = self.core_out
        (oy0, _), (ox0, _) = self.crop_out
        return slice(cy0 - oy0, cy1 - oy0), slice(cx0 - ox0, cx1 - ox0)


def halo_for(up: object) -> float:
    """Context each tile needs, in low-res cells: ``up.tile_halo`` if set, a bound for JBU stacks, else 8.

    For a stack of 2x stages with kernel radius ``r`` whose sources are resampled with a kernel reaching
    ``s`` source pixels (1 bilinear, 2 bicubic), stage ``k`` reaches ``r / 2**k + s / 2**(k-1)`` cells, so
    any number of stages reaches less than ``r + 2 s`` cells; one cell is added as margin. (Measured on
    ``JBUStack``: tiles match untiled to 1e-15 from 4 cells (bilinear) and 6 cells (bicubic, ``original``);
    the bound gives 6 and 8.) A guidance encoder looks 2 more full-resolution pixels out, at most one more
    cell whenever a cell spans two or more pixels, so one more cell is added for it.
    """
    explicit = getattr(up, "tile_halo", None)
    if explicit is not None:
        return float(explicit)
    radius, mode = getattr(up, "radius", None), getattr(up, "resize_mode", None)
    support = {"nearest": 1, "nearest-exact": 1, "bilinear": 1, "bicubic": 2}.get(str(mode))
    if isinstance(radius, int) and radius >= 0 and support is not None:
        encoder = getattr(up, "encoder", None)
        return float(radius + 2 * support + 1 + (encoder is not None))
    return float(DEFAULT_HALO_CELLS)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def alignment_unit(lr: int, *sizes: int) -> int:
    """Smallest number of low-res cells whose extent is a whole number of pixels in every one of ``sizes``.

    A crop that starts and ends on multiples of this unit has exactly the full map's scale ratios, which is
    what makes tiled and untiled results agree. For a ViT-16 at 4096 px (256 cells -> 4096 px) the unit is one
    cell; for 292 cells -> 4096 px it is 73 cells (1024 px).
    """
    unit = 1
    for size in sizes:
        unit = _lcm(unit, lr // math.gcd(lr, size))
    return unit


def _axis_plan(lr: int, out: int, image: int | None, tile_px: int, halo_px: int | None, halo_cells: float):
    sizes = (out,) if image is None else (out, image)
    unit = alignment_unit(lr, *sizes)
    core = max(unit, (int(tile_px * lr / out) // unit) * unit)  # cells per core tile, >= one unit
    cells = halo_cells if halo_px is None else halo_px * lr / out
    halo = math.ceil(math.ceil(cells - 1e-9) / unit) * unit if cells > 0 else 0
    spans = []
    for start in range(0, lr, core):
        stop = min(lr, start + core)
        spans.append(((start, stop), (max(0, start - halo), min(lr, stop + halo))))
    return spans


def plan_tiles(
    lr_size: Sequence[int],
    output_size: Sequence[int],
    image_size: Sequence[int] | None = None,
    *,
    tile: int = 512,
    overlap: int | None = None,
    halo_cells: float = DEFAULT_HALO_CELLS,
) -> list[Tile]:
    """The tiles ``tiled_upsample`` runs, in row-major order (pure arithmetic, no tensors).

    Args:
        lr_size: (h, w) of the low-resolution features.
        output_size: (H, W) of the output.
        image_size: (Hi, Wi) of the guidance image, or None for unguided upsamplers.
        tile: target core tile edge in output pixels; rounded down to a multiple of the alignment unit
            (but at least one unit).
        overlap: halo on each side in output pixels (rounded up to whole alignment units); None uses
            ``halo_cells``.
        halo_cells: halo on each side in low-res cells when ``overlap`` is None.
    """
    if tile < 1:
        raise ValueError(f"expected tile >= 1 output pixels, got {tile}")
    if overlap is not None and overlap < 0:
        raise ValueError(f"expected overlap >= 0 output pixels, got {overlap}")
    (h, w), (oh, ow) = (int(s) for s in lr_size), (int(s) for s in output_size)
    ih, iw = (None, None) if image_size is None else (int(s) for s in image_size)
    rows = _axis_plan(h, oh, ih, tile, overlap, halo_cells)
    cols = _axis_plan(w, ow, iw, tile, overlap, halo_cells)

    def px(span: tuple[int, int], lr: int, size: int) -> tuple[int, int]:
        return span[0] * size // lr, span[1] * size // lr  # exact: spans lie on the alignment grid

    tiles = []
    for core_y, crop_y in rows:
        for core_x, crop_x in cols:
            tiles.append(
                Tile(
                    core_lr=(core_y, core_x),
                    crop_lr=(crop_y, crop_x),
                    crop_image=None if ih is None else (px(crop_y, h, ih), px(crop_x, w, iw)),
                    crop_out=(px(crop_y, h, oh), px(crop_x, w, ow)),
                    core_out=(px(core_y, h, oh), px(core_x, w, ow)),
                )
            )
    return tiles


def tiled_upsample(
    up: nn.Module | Callable[..., torch.Tensor],
    lr_feats: torch.Tensor,
    image: torch.Tensor | None,
    output_size: int | Sequence[int] | None = None,
    *,
    tile: int = 512,
    overlap: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upsample in overlapping tiles so peak working memory is bounded by the tile size, not the output size.

    Equal to ``up(lr_feats, image, output_size)`` up to floating-point rounding for any local upsampler whose
    receptive field fits in the halo (the JBU stack, the classic JBU, bilinear/bicubic baselines); see the
    module docstring for why. Runs under ``torch.inference_mode()``.

    Args:
        up: any upsampler called as ``up(lr_feats, image, output_size=(H, W))``.
        lr_feats: low-resolution features.
        image: guidance image, RGB in [0, 1] (None only for unguided upsamplers).
        output_size: (H, W) or int; None means the image size.
        tile: target core tile edge in output pixels (default 512); aligned to the alignment unit.
        overlap: halo on each side in output pixels; None uses :func:`halo_for` (``up.tile_halo`` if
            the upsampler defines it, a receptive-field bound for JBU stacks, else ``DEFAULT_HALO_CELLS``).
        out: optional preallocated (B, C, H, W) tensor (e.g. over a ``numpy.memmap``) receiving the result,
            so outputs larger than RAM can be produced.

    An :class:`~featup.core.implicit.ImplicitUpsampler` is not cropped (its field depends on absolute
    coordinates): it is rendered with ``render(size, chunk_pixels=tile * tile)``, already bounded in memory.

    Raises:
        ValueError: bad shapes or ``tile``; a guided upsampler without image; an implicit upsampler with a
            batch of more than one or features of another width than it was fitted to.

    Returns:
        The (B, C, H, W) output (``out`` itself if given).

    Shape:
        - lr_feats: (B, C, h, w)
        - image: (B, 3, Hi, Wi)
        - output: (B, C, H, W)
    """
    check_features(lr_feats, "lr_feats")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"expected tile >= 1 output pixels, got {tile!r}")
    if image is not None:
        check_image(image, lr_feats)
    elif getattr(up, "guided", False):
        raise ValueError(f"{type(up).__name__} is guided: expected image (B,3,H,W), got None")
    from featup.core.implicit import ImplicitUpsampler

    if isinstance(up, ImplicitUpsampler):
        # the same checks as ImplicitUpsampler.upsample: it is fitted to one image, so a batch would
        # silently come back as that one image's (1, C, H, W) features
        if lr_feats.shape[0] != 1:
            raise ValueError(
                "ImplicitUpsampler is fitted to one image: expected lr_feats (1,C,h,w), "
                f"got {tuple(lr_feats.shape)}"
            )
        if lr_feats.shape[1] != up.feat_dim:
            raise ValueError(
                f"expected lr_feats with {up.feat_dim} channels (1,{up.feat_dim},h,w), "
                f"got {tuple(lr_feats.shape)}"
            )
        # an implicit field is a function of the pixel coordinates and the stored image, not of a crop:
        # its render is already evaluated in chunks, here of tile x tile pixels
        size = resolve_size(output_size, image) if (output_size is not None or image is not None) else None
        res = up.render(size, chunk_pixels=tile * tile, dtype=lr_feats.dtype).to(lr_feats.device)
        if out is None:
            return res
        if tuple(out.shape) != tuple(res.shape):
            raise ValueError(f"expected out of shape {tuple(res.shape)}, got {tuple(out.shape)}")
        with torch.inference_mode():
            out.copy_(res)
        return out
    oh, ow = resolve_size(output_size, image)
    b, c, h, w = lr_feats.shape
    halo_cells = halo_for(up)
    plan = plan_tiles(
        (h, w),
        (oh, ow),
        None if image is None else image.shape[-2:],
        tile=tile,
        overlap=overlap,
        halo_cells=halo_cells,
    )
    # back-projection couples every cell of the map: the tiles run without it, the whole output gets it once
    consistent = _without_consistency(up)
    try:
        out = _run_tiles(up, lr_feats, image, plan, (oh, ow), out)
    finally:
        for module in consistent:
            module.consistency = True
    if consistent and oh >= h and ow >= w:
        with torch.inference_mode():
            back_project(out, lr_feats.to(out.device), inplace=True)
    return out


def _without_consistency(up: object) -> list[Any]:
    """Switch off the back-projection of every JBU stack in ``up``; returns the stacks to switch back on."""
    from featup.core.jbu import JBUStack

    modules = up.modules() if isinstance(up, nn.Module) else ()
    found = [m for m in modules if isinstance(m, JBUStack) and m.consistency]
    for module in found:
        module.consistency = False
    return found


def _run_tiles(
    up: Callable[..., torch.Tensor],
    lr_feats: torch.Tensor,
    image: torch.Tensor | None,
    plan: list[Tile],
    size: tuple[int, int],
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Every tile of ``plan`` through ``up``, each core written into ``out`` (allocated on the first tile)."""
    b = lr_feats.shape[0]
    oh, ow = size
    with torch.inference_mode():
        for t in plan:
            (ly0, ly1), (lx0, lx1) = t.crop_lr
            lr_crop = lr_feats[:, :, ly0:ly1, lx0:lx1]
            img_crop = None
            if image is not None and t.crop_image is not None:
                (iy0, iy1), (ix0, ix1) = t.crop_image
                img_crop = image[:, :, iy0:iy1, ix0:ix1]
            res = up(lr_crop, img_crop, output_size=t.crop_out_size)
            if res.dim() != 4 or tuple(res.shape[-2:]) != t.crop_out_size or res.shape[0] != b:
                raise ValueError(
                    f"expected the upsampler to return (B,C,{t.crop_out_size[0]},{t.crop_out_size[1]}) "
                    f"for a tile, got {tuple(res.shape)}"
                )
            if out is None:
                out = torch.empty((b, res.shape[1], oh, ow), dtype=res.dtype, device=res.device)
            elif tuple(out.shape) != (b, res.shape[1], oh, ow):
                raise ValueError(f"expected out of shape {(b, res.shape[1], oh, ow)}, got {tuple(out.shape)}")
            (cy0, cy1), (cx0, cx1) = t.core_out
            sy, sx = t.core_slice
            out[:, :, cy0:cy1, cx0:cx1] = res[:, :, sy, sx]
            del res  # free this tile's result before the next one is computed
    assert out is not None  # the plan is never empty: lr maps are non-empty
    return out
