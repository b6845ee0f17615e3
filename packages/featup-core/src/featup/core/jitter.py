"""Image jitters (pad, zoom, crop, horizontal flip) with recorded, resolution-free parameters.

FeatUp observes many slightly transformed views of one image (Section 3 of the paper) and applies *the same*
transform to its high-resolution feature map before downsampling. Each jitter here is one affine map of
normalized coordinates followed by symmetric (reflect-about-the-border) padding, so a single
``grid_sample`` applies it and the very same parameters act identically on an image and on a feature map of
any resolution: the pad is a fraction of the size and the crop offset is a fraction of the available slack.

The composition, in the order the original code applies it, is: reflect-pad every side by ``pad * size``,
zoom the padded map by ``zoom``, crop a window of the original size whose offset is ``(top, left)`` of the
free room, then flip horizontally if ``flip``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["JitterParams", "apply_jitter", "jitter_grid", "sample_jitter"]


@dataclass(frozen=True)
class JitterParams:
    """One recorded jitter; every field is resolution-free.

    Attributes:
        pad: reflect padding on every side as a fraction of the size along that axis
            (30 px at a 224 px reference size is ``30 / 224``).
        zoom: scale factor applied to the padded map (> 0; FeatUp samples it in ``[1, max_zoom]``).
        top: vertical crop offset as a fraction in ``[0, 1]`` of the free room (0 = top edge of the padded,
            zoomed map, 1 = bottom edge).
        left: horizontal crop offset as a fraction in ``[0, 1]`` of the free room.
        flip: mirror the result left-right.
    """

    pad: float = 0.0
    zoom: float = 1.0
    top: float = 0.5
    left: float = 0.5
    flip: bool = False

    def __post_init__(self) -> None:
        for name in ("pad", "zoom", "top", "left"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"expected JitterParams.{name} as a finite float, got {value!r}")
        if self.pad < 0:
            raise ValueError(f"expected JitterParams.pad >= 0, got {self.pad}")
        if self.zoom <= 0:
            raise ValueError(f"expected JitterParams.zoom > 0, got {self.zoom}")
        if not (0.0 <= self.top <= 1.0 and 0.0 <= self.left <= 1.0):
            raise ValueError(
                f"expected JitterParams.top/left in [0, 1], got top={self.top}, left={self.left}"
            )
        if not isinstance(self.flip, bool):
            raise TypeError(f"expected JitterParams.flip as bool, got {self.flip!r}")

    @classmethod
    def identity(cls) -> JitterParams:
        """The jitter that leaves every map unchanged."""
        return cls()

    @property
    def is_identity(self) -> bool:
        """True when the jitter maps every pixel onto itself (no pad slack, no zoom, no flip)."""
        return (
            self.zoom == 1.0 and not self.flip and (self.pad == 0.0 or (self.top == 0.5 and self.left == 0.5))
        )

    def to_dict(self) -> dict[str, float | bool]:
        """JSON-serialisable record of the jitter."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> JitterParams:
        """Inverse of :meth:`to_dict`."""
        return cls(**record)

    def affine(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The 2x3 matrix taking output to input normalized coordinates ``(x, y)`` in ``[-1, 1]``.

        Along one axis the padded map spans ``[-e, e]`` with ``e = 1 + 2 pad`` (a pad of ``pad * size``
        pixels is ``2 pad`` normalized units); the crop window is ``2 / zoom`` long and starts at
        ``-e + offset * (2 e - 2 / zoom)``; so ``v = u / zoom + start + 1 / zoom``.
        """
        extent = 1.0 + 2.0 * self.pad
        scale = 1.0 / self.zoom
        start_y = -extent + self.top * (2.0 * extent - 2.0 * scale)
        start_x = -extent + self.left * (2.0 * extent - 2.0 * scale)
        sx = -scale if self.flip else scale
        return ((sx, 0.0, start_x + scale), (0.0, scale, start_y + scale))


def sample_jitter(
    generator: torch.Generator | None = None,
    *,
    max_pad: int = 30,
    max_zoom: float = 2.0,
    p_zoom: float = 0.5,
    p_flip: float = 0.5,
    ref_size: int = 224,
) -> JitterParams:
    """Draw one jitter as FeatUp trains (Table 7: 30 px pad, zoom up to 2x for JBU, 1.8x for implicit).

    The map is always reflect-padded by ``max_pad`` pixels at ``ref_size`` (so ``max_pad / ref_size`` of
    the size at any resolution), zoomed by a factor uniform in ``[1, max_zoom]`` with probability
    ``p_zoom`` (else 1), cropped back at a uniform offset, and flipped with probability ``p_flip``.

    Args:
        generator: torch random generator (seeded by the caller, for reproducibility); None: global.
        max_pad: padding in pixels at ``ref_size``.
        max_zoom: largest zoom factor (>= 1).
        p_zoom: probability of zooming.
        p_flip: probability of a horizontal flip.
        ref_size: the size at which ``max_pad`` is measured.

    Returns:
        The recorded :class:`JitterParams`.
    """
    if max_pad < 0 or ref_size <= 0:
        raise ValueError(
            f"expected max_pad >= 0 and ref_size > 0, got max_pad={max_pad}, ref_size={ref_size}"
        )
    if max_zoom < 1.0:
        raise ValueError(f"expected max_zoom >= 1, got {max_zoom}")
    if not (0.0 <= p_zoom <= 1.0 and 0.0 <= p_flip <= 1.0):
        raise ValueError(f"expected probabilities in [0, 1], got p_zoom={p_zoom}, p_flip={p_flip}")
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    zoom = 1.0 + u[1] * (max_zoom - 1.0) if u[0] < p_zoom else 1.0
    return JitterParams(pad=max_pad / ref_size, zoom=zoom, top=u[2], left=u[3], flip=u[4] < p_flip)


def jitter_grid(
    params: JitterParams | Sequence[JitterParams],
    size: tuple[int, int],
    batch: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sampling grid of the jitter for ``grid_sample(..., align_corners=False)``.

    Shape:
        - output: (B, H, W, 2) normalized input coordinates ``(x, y)``, possibly outside ``[-1, 1]``
          (``grid_sample``'s reflection padding folds them back)
    """
    plist = _as_param_list(params, batch)
    theta = torch.tensor([p.affine() for p in plist], dtype=torch.float64)
    grid = F.affine_grid(theta, [len(plist), 1, int(size[0]), int(size[1])], align_corners=False)
    return grid.to(device=device, dtype=dtype)


def apply_jitter(
    x: torch.Tensor,
    params: JitterParams | Sequence[JitterParams],
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Apply a recorded jitter to an image or feature map; the output has the input's size.

    The same ``params`` move image content and feature content identically, whatever the resolution of each.

    Args:
        x: images or feature maps.
        params: one jitter for the whole batch, or one per batch item.
        mode: ``grid_sample`` interpolation, "bilinear" (default) or "nearest".

    Returns:
        The jittered maps (differentiable in ``x``).

    Shape:
        - x: (B, C, H, W), any H, W >= 1
        - output: (B, C, H, W)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected x as a torch.Tensor (B,C,H,W), got {type(x).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"expected x (B,C,H,W) non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point x, got dtype {x.dtype}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"expected mode 'bilinear' or 'nearest', got {mode!r}")
    plist = _as_param_list(params, x.shape[0])
    # the flip is applied exactly, after resampling (mirroring the output equals mirroring the grid)
    unflipped = [replace(p, flip=False) for p in plist]
    if all(p.is_identity for p in unflipped):
        out = x.clone()
    else:
        grid = jitter_grid(unflipped, (x.shape[-2], x.shape[-1]), x.shape[0], device=x.device, dtype=x.dtype)
        out = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
    flips = [p.flip for p in plist]
    if all(flips):
        return out.flip(-1)
    if any(flips):
        mask = torch.tensor(flips, device=x.device).view(-1, 1, 1, 1)
        return torch.where(mask, out.flip(-1), out)
    return out


def _as_param_list(params: JitterParams | Sequence[JitterParams], batch: int) -> list[JitterParams]:
    if isinstance(params, JitterParams):
        return [params] * batch
    plist = list(params)
    if not all(isinstance(p, JitterParams) for p in plist):
        raise TypeError("expected JitterParams or a sequence of JitterParams")
    if len(plist) != batch:
        raise ValueError(f"expected one JitterParams per batch item ({batch}), got {len(plist)}")
    return plist
