"""Tiny generated datasets in each real on-disk format, and a tiny deterministic backbone.

They exist so every evaluation (linear probes, CAM faithfulness, end-to-end segmentation) runs end to end in
seconds, through the same readers a user's real COCO-Stuff / ImageNet / ADE20K folders go through. Scenes are
drawn so labels are predictable from the pixels: each class has its own colour (with noise) and shape, objects
sit at random places and sizes, and images are non-square so the readers' resize-and-crop path is exercised.

``tiny_backbone`` is importable by spec (``--backbone featup.eval.fixtures:tiny_backbone``), so the commands
can be tried without any pretrained weights; its ``stride`` argument gives the strided baseline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "TinyBackbone",
    "make_ade20k",
    "make_all",
    "make_cocostuff",
    "make_imagenet_folder",
    "tiny_backbone",
]

# COCO-Stuff fine indices (stuffthingmaps values) used by the fixture, with the colour that identifies them
_COCO_THINGS = {0: (220, 40, 40), 2: (230, 210, 30), 17: (150, 60, 190)}  # person, car, dog
_COCO_STUFF_TOP = {156: (90, 150, 235)}  # sky-other
_COCO_STUFF_BOTTOM = {123: (60, 170, 60), 170: (150, 95, 60)}  # grass, wall-brick
_ADE_CLASSES = {1: (120, 120, 120), 3: (80, 50, 50), 5: (4, 200, 3), 13: (150, 5, 61), 21: (0, 102, 200)}


class TinyBackbone(nn.Module):
    """A two-layer conv net with a patchify stem: ``(B,3,H,W) -> (B,dim,H/stride,W/stride)``.

    The stem is a ``patch x patch`` convolution applied every ``stride`` pixels (stride = patch by default,
    like a ViT patch embedding); a smaller ``stride`` with the same weights is the strided baseline.
    Weights come from ``seed`` alone, so two instances with one seed compute the same function.

    Shape:
        - image: (B, 3, H, W) RGB in [0, 1], H and W multiples of ``stride``
        - output: (B, dim, H/stride, W/stride)
    """

    def __init__(self, dim: int = 16, patch: int = 8, stride: int | None = None, seed: int = 0) -> None:
        super().__init__()
        stride = patch if stride is None else int(stride)
        if stride < 1 or stride > patch:
            raise ValueError(f"expected 1 <= stride <= patch={patch}, got stride={stride}")
        self.feat_dim, self.patch, self.stride, self.seed = dim, patch, stride, seed
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, patch, stride)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected image (B,3,H,W), got shape {tuple(image.shape)}")
        extra = self.patch - self.stride
        x = F.pad(
            (image - 0.45) / 0.25,
            (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2),
            mode="replicate",
        )
        f = F.gelu(self.embed(x))
        return f + self.mix(F.gelu(f))

    def extra_repr(self) -> str:
        return f"dim={self.feat_dim}, patch={self.patch}, stride={self.stride}, seed={self.seed}"


def tiny_backbone(
    stride: int | None = None, dim: int = 16, patch: int = 8, seed: int = 0, **_: object
) -> TinyBackbone:
    """Factory for ``--backbone featup.eval.fixtures:tiny_backbone`` (extra keyword arguments are ignored)."""
    return TinyBackbone(dim=dim, patch=patch, stride=stride, seed=seed)


def _noisy(
    color: tuple[int, int, int], shape: tuple[int, int], rng: np.random.Generator, amp: float = 18
) -> np.ndarray:
    base = np.array(color, dtype=np.float32)[None, None] * rng.uniform(0.8, 1.15)
    return np.clip(base + rng.normal(0, amp, (*shape, 3)), 0, 255)


def _shape_mask(
    height: int, width: int, rng: np.random.Generator, *, min_frac: float = 0.2, max_frac: float = 0.5
) -> np.ndarray:
    """A random ellipse or rectangle covering roughly min_frac..max_frac of each side."""
    h = max(2, int(rng.uniform(min_frac, max_frac) * height))
    w = max(2, int(rng.uniform(min_frac, max_frac) * width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    yy, xx = np.mgrid[:height, :width]
    if rng.random() < 0.5:
        return (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
    cy, cx = top + h / 2, left + w / 2
    return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1


def _save_rgb(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "RGB").save(path, quality=95)


def _save_label(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def make_cocostuff(
    root: str | os.PathLike,
    *,
    n_train: int = 8,
    n_val: int = 4,
    size: tuple[int, int] = (48, 64),
    depth: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny COCO-Stuff: ``images/{train2017,val2017}/*.jpg``, ``annotations/...*.png`` (fine labels).

    Scenes: sky over grass or brick wall, with one or two things (person, car, dog) in front and an unlabeled
    (255) border strip. With ``depth=True`` also writes ``depth/<split>/`` pseudo-depth: ``.npy`` float maps
    for train2017 and 16-bit PNGs for val2017 (both formats the reader accepts, same units: depth x 100);
    depth grows towards the horizon, things are near.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    yy = np.mgrid[:height, :width][0].astype(np.float32)
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        for i in range(count):
            name = f"{i + 1:012d}"
            horizon = int(rng.uniform(0.3, 0.6) * height)
            bottom_cls = list(_COCO_STUFF_BOTTOM)[i % 2]
            label = np.full((height, width), bottom_cls, np.int64)
            label[:horizon] = 156
            img = np.where(
                (yy < horizon)[..., None],
                _noisy(_COCO_STUFF_TOP[156], size, rng),
                _noisy(_COCO_STUFF_BOTTOM[bottom_cls], size, rng),
            )
            dep = np.where(yy < horizon, 80.0, 2.0 + 30.0 * (height - yy) / max(1, height - horizon))
            for k in range(1 + int(rng.integers(0, 2))):
                cls = list(_COCO_THINGS)[(i + k) % len(_COCO_THINGS)]
                mask = _shape_mask(height, width, rng)
                label[mask] = cls
                img[mask] = _noisy(_COCO_THINGS[cls], size, rng)[mask]
                dep[mask] = rng.uniform(1.0, 4.0)
            label[:, :2] = 255  # an unlabeled strip, as stuffthingmaps have
            _save_rgb(root / "images" / split / f"{name}.jpg", img)
            _save_label(root / "annotations" / split / f"{name}.png", label)
            if depth:
                out = root / "depth" / split
                out.mkdir(parents=True, exist_ok=True)
                if split == "train2017":
                    np.save(out / f"{name}.npy", (dep * 100).astype(np.float32))
                else:
                    Image.fromarray((dep * 100).astype(np.uint16)).save(out / f"{name}.png")
    return root


def make_imagenet_folder(
    root: str | os.PathLike,
    *,
    n_classes: int = 3,
    n_train: int = 6,
    n_val: int = 4,
    size: tuple[int, int] = (48, 56),
    seed: int = 0,
) -> Path:
    """Write a tiny ImageNet-style folder ``{train,val}/<wnid>/<name>.JPEG``: one coloured object each."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 210, 30), (150, 60, 190)]
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            wnid = f"n{c + 1:08d}"
            for i in range(count):
                img = _noisy((128, 128, 128), size, rng, amp=40)
                mask = _shape_mask(*size, rng, min_frac=0.3, max_frac=0.6)
                img[mask] = _noisy(palette[c % len(palette)], size, rng)[mask]
                _save_rgb(root / split / wnid / f"{split}_{c}_{i:04d}.JPEG", img)
    return root


def make_ade20k(
    root: str | os.PathLike,
    *,
    n_train: int = 8,
    n_val: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> Path:
    """Write a tiny ``ADEChallengeData2016``: ``images/{training,validation}/*.jpg`` and labels (0..150)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    classes = list(_ADE_CLASSES)
    for split, count, prefix in (("training", n_train, "ADE_train"), ("validation", n_val, "ADE_val")):
        for i in range(count):
            name = f"{prefix}_{i + 1:08d}"
            back = classes[i % 2]
            label = np.full((height, width), back, np.int64)
            img = _noisy(_ADE_CLASSES[back], size, rng)
            for k in range(2):
                cls = classes[2 + (i + k) % (len(classes) - 2)]
                mask = _shape_mask(height, width, rng)
                label[mask] = cls
                img[mask] = _noisy(_ADE_CLASSES[cls], size, rng)[mask]
            label[-2:] = 0  # "other", ignored by the benchmark
            _save_rgb(root / "images" / split / f"{name}.jpg", img)
            _save_label(root / "annotations" / split / f"{name}.png", label)
    return root


def make_all(root: str | os.PathLike, *, seed: int = 0) -> dict[str, Path]:
    """Write all three fixtures under ``root``: ``cocostuff/`` (with depth), ``imagenet/``, ``ade20k/``."""
    root = Path(root)
    return {
        "cocostuff": make_cocostuff(root / "cocostuff", seed=seed),
        "imagenet": make_imagenet_folder(root / "imagenet", seed=seed),
        "ade20k": make_ade20k(root / "ade20k", seed=seed),
    }
