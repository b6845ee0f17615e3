"""The backbone contract: RGB in [0, 1] of any size in, a (B, C, h, w) feature grid out.

Every backbone returned by :func:`featup.backbones.create_backbone` or :func:`featup.backbones.wrap_backbone`
is a :class:`Backbone`:

- ``bb(image)`` takes an RGB float tensor in [0, 1] of shape (B, 3, H, W) with any H, W and returns
  features (B, C, h, w). The network's own normalization (``bb.mean``, ``bb.std``) is applied inside, exactly
  once; passing an already-normalized image is rejected (values far outside [0, 1]).
- ``bb.feat_dim`` (C) and ``bb.stride`` (input pixels per feature cell) describe the output.
- Sizes that are not a multiple of the stride are handled by the ``fit`` rule (default ``"resize"``): the
  normalized image is resized (bilinear, antialiased) to the nearest multiple of the stride, so
  ``h = max(1, round(H / stride))``, ``w = max(1, round(W / stride))`` and the h x w cells tile the *whole*
  image evenly (cell i covers rows [i * H / h, (i + 1) * H / h)). ``fit="pad"`` instead pads the bottom/right
  with the mean color to the next multiple (``h = ceil(H / stride)``; the last cells overhang the image);
  ``fit="none"`` passes the image unchanged (ViTs then require multiples of the stride).
  :meth:`Backbone.output_size` returns the grid for a given input size.
- Frozen by default: parameters do not require gradients and the module stays in eval mode even when
  ``.train()`` is called on it or on a parent module (dropout and batch-norm statistics never switch to
  training behavior; the original project returned modules in train mode). Gradients still flow to the
  input image. ``frozen=False`` gives a trainable module whose ``.train()`` works normally.
- ``use_norm=True`` applies a LayerNorm over channels without affine parameters to the output (the original
  project's ``use_norm``, which its published JBU upsamplers expect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIT_MODES", "Backbone", "FitMode", "channel_norm", "check_image"]

FitMode = Literal["resize", "pad", "none"]
FIT_MODES: tuple[str, ...] = ("resize", "pad", "none")

# An image in [0, 1] resized with bicubic/antialiasing overshoots by a few hundredths; an ImageNet-normalized
# image spans about [-2.1, 2.6]. Anything past these bounds was normalized already (or is not an image).
_RANGE_LOW, _RANGE_HIGH = -0.5, 1.5


def channel_norm(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the channel dimension without affine parameters, independently per pixel.

    Args:
        feats: feature grid.
        eps: added to the variance (the original project used ``nn.LayerNorm``'s default 1e-5).

    Returns:
        Features with zero mean and unit variance over channels at every pixel.

    Shape:
        - feats: (B, C, h, w)
        - output: (B, C, h, w)
    """
    if feats.dim() != 4:
        raise ValueError(f"expected features (B,C,h,w), got {tuple(feats.shape)}")
    return F.layer_norm(feats.permute(0, 2, 3, 1), feats.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def check_image(image: object, check_range: bool = True) -> torch.Tensor:
    """Validate an RGB batch in [0, 1] and return it.

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: wrong shape, empty, or values far outside [0, 1] (already normalized).

    Shape:
        - image: (B, 3, H, W)
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected an image tensor (B,3,H,W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an RGB image (B,3,H,W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"expected a floating-point RGB image in [0,1], got dtype {image.dtype}")
    if image.numel() == 0:
        raise ValueError(f"expected a non-empty image (B,3,H,W), got {tuple(image.shape)}")
    if check_range:
        lo, hi = torch.aminmax(image.detach())
        lo_f, hi_f = float(lo), float(hi)
        if not (lo_f >= _RANGE_LOW and hi_f <= _RANGE_HIGH):
            raise ValueError(
                f"expected RGB values in [0,1], got values in [{lo_f:.3g}, {hi_f:.3g}]; pass un-normalized "
                "images: the backbone applies its mean/std itself (check_range=False disables this check)"
            )
    return image


def _round_cells(size: int, stride: int) -> int:
    # round half up, never below one cell
    return max(1, math.floor(size / stride + 0.5))


class Backbone(nn.Module):
    """Base class of every adapter: normalization, size fitting, ``use_norm`` and frozen eval mode.

    Subclasses implement :meth:`forward_features`, which receives the normalized, fitted image.

    Args:
        feat_dim: output channels C.
        stride: input pixels per output cell.
        mean: RGB mean subtracted inside ``forward`` (``None``: no normalization).
        std: RGB standard deviation divided inside ``forward`` (``None`` together with ``mean``).
        name: name shown in ``repr`` (the registry name for registered backbones).
        use_norm: apply :func:`channel_norm` to the output.
        fit: how sizes that are not a multiple of ``stride`` are handled: ``"resize"``, ``"pad"`` or
            ``"none"`` (see the module docstring).
        frozen: parameters without gradients and eval mode that ``.train()`` cannot undo.
        check_range: reject inputs with values far outside [0, 1] (a sign of double normalization).

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, feat_dim, h, w) with (h, w) = ``output_size(H, W)``
    """

    def __init__(
        self,
        *,
        feat_dim: int,
        stride: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        name: str = "backbone",
        use_norm: bool = False,
        fit: FitMode = "resize",
        frozen: bool = True,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if int(feat_dim) < 1 or int(stride) < 1:
            raise ValueError(
                f"expected positive feat_dim and stride, got feat_dim={feat_dim}, stride={stride}"
            )
        if fit not in FIT_MODES:
            raise ValueError(f"expected fit in {FIT_MODES}, got {fit!r}")
        if (mean is None) != (std is None):
            raise ValueError(f"expected both mean and std or neither, got mean={mean}, std={std}")
        self.feat_dim = int(feat_dim)
        self.stride = int(stride)
        self.name = name
        self.use_norm = bool(use_norm)
        self.fit = fit
        self.frozen = bool(frozen)
        self.check_range = bool(check_range)
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        if mean is not None and std is not None:
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"expected 3 means and 3 positive stds, got mean={mean}, std={std}")
            self.mean = tuple(float(m) for m in mean)
            self.std = tuple(float(s) for s in std)
            # non-persistent buffers: follow .to(device) but stay out of state dicts and weight files
            self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------------------- contract
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Features of an RGB batch in [0, 1].

        Shape:
            - image: (B, 3, H, W)
            - output: (B, feat_dim, h, w)
        """
        check_image(image, self.check_range)
        ref = self._reference_tensor()
        if ref is not None:
            if ref.device != image.device:
                raise ValueError(
                    f"expected the image on {ref.device} (the backbone's device), got {image.device}"
                )
            image = image.to(ref.dtype)
        x = self.normalize(image)
        x = self.fit_input(x)
        feats = self.forward_features(x)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"{self.name}: expected features (B,C,h,w) from the network, got {got}")
        if feats.shape[1] != self.feat_dim:
            raise ValueError(f"{self.name}: expected {self.feat_dim} feature channels, got {feats.shape[1]}")
        if self.use_norm:
            feats = channel_norm(feats)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Network features of a normalized, fitted image (implemented by subclasses).

        Shape:
            - x: (B, 3, H', W'), H' and W' multiples of ``stride`` unless ``fit="none"``
            - output: (B, feat_dim, H' / stride, W' / stride)
        """
        raise NotImplementedError

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``(image - mean) / std`` with the network's statistics (identity without them).

        Shape:
            - image: (B, 3, H, W)
            - output: (B, 3, H, W)
        """
        if self.mean is None:
            return image
        return (image - self.pixel_mean.to(image.dtype)) / self.pixel_std.to(image.dtype)

    def fit_input(self, x: torch.Tensor) -> torch.Tensor:
        """Resize or pad a (normalized) image to the size the ``fit`` rule prescribes.

        Shape:
            - x: (B, 3, H, W)
            - output: (B, 3, h * stride, w * stride) with (h, w) = ``output_size(H, W)``; unchanged for
              ``fit="none"``
        """
        if self.fit == "none":
            return x
        height, width = x.shape[-2:]
        h, w = self._fitted_cells(height, width)
        target = (h * self.stride, w * self.stride)
        if (height, width) == target:
            return x
        if self.fit == "resize":
            return F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        # zeros after normalization are the dataset's mean color
        return F.pad(x, (0, target[1] - width, 0, target[0] - height))

    def output_size(self, height: int, width: int) -> tuple[int, int] | None:
        """Feature grid (h, w) returned for an input of ``height`` x ``width`` pixels.

        Returns ``None`` when ``fit="none"`` and the network's own size arithmetic is unknown.
        """
        if height < 1 or width < 1:
            raise ValueError(f"expected a positive image size, got {height}x{width}")
        if self.fit == "none":
            return self._natural_output_size(height, width)
        return self._fitted_cells(height, width)

    # --------------------------------------------------------------------------------------------- helpers
    def _fitted_cells(self, height: int, width: int) -> tuple[int, int]:
        if self.fit == "pad":
            return math.ceil(height / self.stride), math.ceil(width / self.stride)
        return _round_cells(height, self.stride), _round_cells(width, self.stride)

    def _natural_output_size(self, height: int, width: int) -> tuple[int, int] | None:
        return None

    def _reference_tensor(self) -> torch.Tensor | None:
        for p in self.parameters():
            if p.is_floating_point():
                return p
        for b in self.buffers():
            if b.is_floating_point():
                return b
        return None

    def freeze_(self) -> Backbone:
        """Disable parameter gradients and switch to (locked) eval mode; returns ``self``."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Set training mode; a frozen backbone ignores this and stays in eval mode (see module docstring)."""
        return super().train(False if self.frozen else mode)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, feat_dim={self.feat_dim}, stride={self.stride}, fit={self.fit!r}, "
            f"use_norm={self.use_norm}, frozen={self.frozen}"
        )
