"""Boundary checks shared by every public entry point: they say what was expected and what came."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_bool",
    "check_features",
    "check_float",
    "check_image",
    "check_int",
    "check_probability",
    "check_unit_range",
    "resolve_size",
]


def check_int(name: str, value: object, minimum: int) -> int:
    """Require an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} as an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object, minimum: float, *, strict: bool = False) -> float:
    """Require a finite number >= ``minimum`` (> with ``strict``); returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"expected {name} as a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"expected {name} {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    """Require a number in [0, 1]."""
    value = check_float(name, value, 0.0)
    if value > 1.0:
        raise ValueError(f"expected {name} in [0, 1], got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Require True or False (not a truthy value)."""
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} as True or False, got {value!r}")
    return value


def check_features(feats: object, name: str = "features") -> torch.Tensor:
    """Require a floating tensor of shape (B, C, h, w) with non-empty dimensions."""
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor (B,C,h,w), got {type(feats).__name__}")
    if feats.dim() != 4:
        raise ValueError(f"expected {name} (B,C,h,w), got shape {tuple(feats.shape)}")
    if feats.numel() == 0:
        raise ValueError(f"expected non-empty {name} (B,C,h,w), got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise ValueError(f"expected floating-point {name}, got dtype {feats.dtype}")
    return feats


def check_image(image: object, feats: torch.Tensor | None = None, name: str = "image") -> torch.Tensor:
    """Require an RGB image batch (B, 3, H, W) matching the features' batch size and device."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor (B,3,H,W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected {name} (B,3,H,W) RGB in [0,1], got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"expected non-empty {name} (B,3,H,W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected a floating-point {name} in [0,1], got dtype {image.dtype}")
    check_unit_range(image, name)
    if feats is not None:
        if feats.shape[0] != image.shape[0]:
            raise ValueError(
                f"expected {name} batch size to match features: features have B={feats.shape[0]}, "
                f"{name} has B={image.shape[0]}"
            )
        if feats.device != image.device:
            raise ValueError(
                f"expected features and {name} on one device, got {feats.device} and {image.device}"
            )
    return image


def check_unit_range(image: torch.Tensor, name: str = "image", tol: float = 1e-3) -> torch.Tensor:
    """Require finite values in [0, 1] (up to ``tol`` of rounding): un-normalized RGB, no NaN.

    A NaN or an ImageNet-normalized image would otherwise give silently wrong guidance.
    """
    with torch.no_grad():
        finite = bool(torch.isfinite(image).all())
        lo, hi = float(image.detach().min()), float(image.detach().max())
    if not finite or lo < -tol or hi > 1 + tol:
        what = "NaN/inf values" if not finite else f"values in [{lo:.3g}, {hi:.3g}]"
        raise ValueError(
            f"expected {name} RGB in [0,1] (un-normalized; upsamplers normalize internally), got {what}"
        )
    return image


def resolve_size(output_size: int | Sequence[int] | None, image: torch.Tensor | None) -> tuple[int, int]:
    """Output size as (H, W): an int means square, None means the image's size."""
    if output_size is None:
        if image is None:
            raise ValueError("expected output_size (H, W) when no guidance image is given, got None")
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(output_size, int):
        size = (output_size, output_size)
    else:
        size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"expected output_size as positive (H, W), got {output_size!r}")
    return size  # type: ignore[return-value]
