"""Reading images and writing PNGs for the ``featup`` command: clear errors, atomic writes."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from featup.eval.errors import UsageError

__all__ = ["ensure_writable_dir", "load_image", "parse_point", "parse_size", "save_png", "to_uint8"]


def load_image(path: str | os.PathLike, size: Sequence[int] | None = None) -> torch.Tensor:
    """Read an image file as RGB in [0, 1], optionally resized (bilinear, antialiased) to ``size`` (H, W).

    Raises:
        UsageError: the file is missing, is not a readable image, or is empty.

    Shape:
        - output: (1, 3, H, W) float32
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UsageError(f"cannot read image {path}: not a valid image file ({type(exc).__name__})") from None
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    if arr.size == 0:
        raise UsageError(f"cannot read image {path}: it has no pixels")
    image = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    if size is not None:
        image = F.interpolate(
            image, size=tuple(int(s) for s in size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    return image


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or one number for a square) -> (H, W)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"expected a size as HxW (e.g. 224x336), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise UsageError(f"expected a size as HxW with positive numbers, got {text!r}")
    return values[0], values[1]


def parse_point(text: str) -> tuple[float, float]:
    """``"X,Y"`` in pixels of the query image -> (x, y)."""
    parts = text.split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"expected a point as X,Y in pixels (e.g. 120,64), got {text!r}") from None
    return x, y


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written into it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".featup-write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    if rgb.dim() == 4:
        rgb = rgb[0]
    return (rgb.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: Image.Image | np.ndarray | torch.Tensor) -> Path:
    """Write a PNG through a temporary file and a rename."""
    from featup.core.checkpoint import atomic_write_bytes

    if isinstance(image, torch.Tensor):
        image = to_uint8(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
