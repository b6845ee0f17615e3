"""Readers for the evaluation datasets in their standard on-disk layouts.

- COCO-Stuff (``images/<split>/*.jpg`` + ``annotations/<split>/*.png`` stuffthingmaps with fine labels
  0..181 and 255 = unlabeled), mapped to the 27 coarse classes of the paper's linear probes (STEGO/PiCIE).
- A depth folder: ``images/<split>/*.jpg`` + ``depth/<split>/<stem>.{npy,png,tif,tiff}`` (pseudo-depth, e.g.
  MiDaS output). A COCO-Stuff root with ``depth/`` beside ``annotations/`` serves both probes at once.
- An ImageNet-style folder: ``<split>/<class>/*.JPEG`` (torchvision ``ImageFolder`` layout).
- ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png`` with
  0 = other (ignored) and 1..150 the classes, shifted to 0..149 (mmsegmentation's ``reduce_zero_label``).

Every reader returns dict samples: ``image`` (3,H,W) RGB float in [0,1], plus ``seg`` (H,W) int64 with 255 for
ignored pixels, ``depth`` (H,W) float32, or ``label`` (int), and ``name`` (file stem).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "ADE20K",
    "ADE20K_N_CLASSES",
    "COCOSTUFF27_CLASSES",
    "COCOSTUFF_FINE_TO_COARSE",
    "IGNORE_INDEX",
    "CocoStuff",
    "DepthFolder",
    "ImageFolder",
    "coarse_labels",
    "load_depth",
    "load_image",
    "load_label",
    "open_probe_dataset",
]

IGNORE_INDEX = 255
ADE20K_N_CLASSES = 150
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEPTH_EXTENSIONS = (".npy", ".png", ".tif", ".tiff")

#: fine stuffthingmaps index (0..181) -> coarse class (0..26), as in STEGO / PiCIE (12 thing, 15 stuff groups)
# fmt: off
COCOSTUFF_FINE_TO_COARSE: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5,
    5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0,
    0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20, 22, 15, 25, 16,
    13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21,
    21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24,
    20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,
    18, 18, 26, 26, 19, 19, 24,
)
# fmt: on

# fmt: off
COCOSTUFF27_CLASSES: tuple[str, ...] = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff",
    "rawmaterial", "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural",
    "water",
)
# fmt: on

_COARSE_LUT = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
_COARSE_LUT[: len(COCOSTUFF_FINE_TO_COARSE)] = torch.tensor(COCOSTUFF_FINE_TO_COARSE)


def coarse_labels(fine: torch.Tensor) -> torch.Tensor:
    """Map COCO-Stuff fine labels (0..181, 255 unlabeled) to the 27 coarse classes (255 stays 255).

    Shape:
        - fine: any shape, integer values in [0, 255]
        - output: same shape, int64
    """
    if fine.is_floating_point():
        raise TypeError(f"expected integer COCO-Stuff labels, got dtype {fine.dtype}")
    if fine.numel() and (int(fine.min()) < 0 or int(fine.max()) > 255):
        raise ValueError(
            f"expected COCO-Stuff labels in [0, 255], got range [{int(fine.min())}, {int(fine.max())}]"
        )
    return _COARSE_LUT.to(fine.device)[fine.long()]


def _resize_crop_box(
    width: int, height: int, size: int | None
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Shorter side to ``size`` then a centered size x size crop (the paper's 224 px center crop)."""
    if size is None:
        return (width, height), (0, 0, width, height)
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


def load_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read an RGB image: shorter side resized to ``size`` (bicubic, antialiased) and center-cropped square.

    Shape:
        - output: (3, size, size) float in [0, 1]; (3, H, W) when ``size`` is None
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            new, box = _resize_crop_box(img.width, img.height, size)
            if new != (img.width, img.height):
                img = img.resize(new, Image.BICUBIC)
            img = img.crop(box)
            arr = np.asarray(img, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def load_label(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read a label PNG (one class index per pixel), resized with nearest neighbour like :func:`load_image`.

    Shape:
        - output: (size, size) int64; (H, W) when ``size`` is None
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                img = img.convert("L")
            new, box = _resize_crop_box(img.width, img.height, size)
            if new != (img.width, img.height):
                img = img.resize(new, Image.NEAREST)
            arr = np.asarray(img.crop(box)).astype(np.int64)
    except (OSError, SyntaxError) as exc:
        raise OSError(f"cannot read label map {path}: {exc}") from None
    return torch.from_numpy(arr)


def load_depth(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Read a depth map (``.npy`` float, or 8/16-bit/float ``.png``/``.tif``), resized like ``load_image``.

    Values are returned as stored (pseudo-depth is relative, so no unit conversion is applied); resizing uses
    area averaging when shrinking and bilinear interpolation when enlarging.

    Shape:
        - output: (size, size) float32; (H, W) when ``size`` is None
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"cannot read depth map {path}: {exc}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected a single-channel depth map (H,W) in {path}, got shape {arr.shape}")
    depth = torch.from_numpy(arr.copy())
    if size is None:
        return depth
    height, width = depth.shape
    (new_w, new_h), (left, top, right, bottom) = _resize_crop_box(width, height, size)
    if (new_w, new_h) != (width, height):
        mode = "area" if new_w < width else "bilinear"
        kw: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
        depth = F.interpolate(depth[None, None], size=(new_h, new_w), mode=mode, **kw)[0, 0]
    return depth[top:bottom, left:right].contiguous()


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"expected an image folder at {folder}, found none")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise FileNotFoundError(f"expected images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}, found none")
    return files


def _find_depth(folder: Path, stem: str) -> Path | None:
    for ext in DEPTH_EXTENSIONS:
        for name in (f"{stem}{ext}", f"{stem}_midas{ext}", f"{stem}_depth{ext}"):
            if (folder / name).is_file():
                return folder / name
    return None


class _Limited(Dataset):
    """Base: a sorted file list, optionally limited to the first ``max_images`` entries."""

    image_files: list[Path]

    def _limit(self, max_images: int | None) -> None:
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f"expected max_images >= 1, got {max_images}")
            self.image_files = self.image_files[:max_images]

    def __len__(self) -> int:
        return len(self.image_files)


class CocoStuff(_Limited):
    """COCO-Stuff 164k in its standard layout, with coarse (27-class) or fine (182-class) labels.

    Args:
        root: folder holding ``images/<split>/`` and ``annotations/<split>/`` (stuffthingmaps PNGs).
        split: ``"train2017"`` or ``"val2017"`` (any sub-folder name works).
        image_size: square center-crop size after resizing the shorter side; None keeps the stored size.
        coarse: map to the 27 coarse classes (the paper's probe); False keeps fine labels 0..181.
        image_list: optional text file of image ids (one per line), e.g. STEGO's curated
            ``curated/<split>/Coco164kFull_Stuff_Coarse_7.txt``; default: every image in the folder.
        depth_dir: folder with ``<split>/<stem>.npy|png|tif`` pseudo-depth; default ``root/depth`` if present.
        max_images: keep only the first N images (sorted by name).

    Shape:
        - sample["image"]: (3, S, S); sample["seg"]: (S, S) int64 (255 = unlabeled); sample["depth"]: (S, S)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val2017",
        image_size: int | None = 224,
        *,
        coarse: bool = True,
        image_list: str | os.PathLike | None = None,
        depth_dir: str | os.PathLike | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split, self.image_size, self.coarse = split, image_size, coarse
        self.n_classes = 27 if coarse else 182
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        if not label_dir.is_dir():
            raise FileNotFoundError(
                f"expected COCO-Stuff label maps in {label_dir} (layout: images/<split>/*.jpg, "
                f"annotations/<split>/*.png), found no such folder"
            )
        if image_list is not None:
            ids = [line.strip() for line in Path(image_list).read_text().splitlines() if line.strip()]
            self.image_files = [image_dir / f"{i}.jpg" for i in ids]
            missing = [p for p in self.image_files if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} images of {image_list} are missing, e.g. {missing[0]}"
                )
        else:
            self.image_files = _list_images(image_dir)
        self.label_files = {p.stem: label_dir / f"{p.stem}.png" for p in self.image_files}
        missing = [s for s, p in self.label_files.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"expected a label map {label_dir / (missing[0] + '.png')}, found none")
        depth_root = Path(depth_dir) if depth_dir is not None else self.root / "depth"
        self.depth_files: dict[str, Path] | None = None
        if (depth_root / split).is_dir():
            found = {p.stem: _find_depth(depth_root / split, p.stem) for p in self.image_files}
            if depth_dir is not None and any(v is None for v in found.values()):
                stem = next(s for s, v in found.items() if v is None)
                raise FileNotFoundError(
                    f"expected a depth map for {stem} in {depth_root / split}, found none"
                )
            if all(v is not None for v in found.values()):
                self.depth_files = found  # type: ignore[assignment]
        elif depth_dir is not None:
            raise FileNotFoundError(f"expected depth maps in {depth_root / split}, found no such folder")
        self._limit(max_images)

    @property
    def has_depth(self) -> bool:
        return self.depth_files is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.image_files[index]
        fine = load_label(self.label_files[path.stem], self.image_size)
        sample = {
            "image": load_image(path, self.image_size),
            "seg": coarse_labels(fine) if self.coarse else fine.masked_fill(fine > 181, IGNORE_INDEX),
            "name": path.stem,
        }
        if self.depth_files is not None:
            sample["depth"] = load_depth(self.depth_files[path.stem], self.image_size)
        return sample


class DepthFolder(_Limited):
    """Images with pseudo-depth: ``images/<split>/*.jpg`` and ``depth/<split>/<stem>.{npy,png,tif,tiff}``.

    Shape:
        - sample["image"]: (3, S, S); sample["depth"]: (S, S) float32
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val2017",
        image_size: int | None = 224,
        *,
        depth_dir: str | os.PathLike | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split, self.image_size = split, image_size
        depth_folder = (Path(depth_dir) if depth_dir is not None else self.root / "depth") / split
        if not depth_folder.is_dir():
            raise FileNotFoundError(f"expected depth maps in {depth_folder}, found no such folder")
        self.image_files = _list_images(self.root / "images" / split)
        self.depth_files: dict[str, Path] = {}
        for p in self.image_files:
            found = _find_depth(depth_folder, p.stem)
            if found is None:
                raise FileNotFoundError(f"expected a depth map for {p.name} in {depth_folder}, found none")
            self.depth_files[p.stem] = found
        self._limit(max_images)

    has_depth = True

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.image_files[index]
        return {
            "image": load_image(path, self.image_size),
            "depth": load_depth(self.depth_files[path.stem], self.image_size),
            "name": path.stem,
        }


class ImageFolder(_Limited):
    """An ImageNet-style classification folder: ``root/<split>/<class>/<image>``.

    Class indices follow the sorted class-folder names of ``classes`` (pass the training split's list to the
    validation split so indices agree) or of this split.

    Shape:
        - sample["image"]: (3, S, S); sample["label"]: int
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        image_size: int | None = 224,
        *,
        classes: Sequence[str] | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root) / split
        self.image_size = image_size
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"expected an ImageNet-style folder {self.root} (<split>/<class>/<image>), found none"
            )
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"expected class sub-folders in {self.root}, found none")
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise ValueError(
                f"class folder {unknown[0]!r} in {self.root} is not among the {len(self.classes)} classes"
            )
        self.samples: list[tuple[Path, int]] = []
        for c in found:
            files = sorted(p for p in (self.root / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples.extend((p, index[c]) for p in files)
        if not self.samples:
            raise FileNotFoundError(f"expected images in the class folders of {self.root}, found none")
        self.image_files = [p for p, _ in self.samples]
        if max_images is not None:
            self._limit(max_images)
            self.samples = self.samples[: len(self.image_files)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": load_image(path, self.image_size), "label": label, "name": path.stem}


class ADE20K(_Limited):
    """ADE20K scene parsing (``ADEChallengeData2016``): 150 classes, 0 = other (ignored).

    Args:
        root: folder with ``images/<split>/`` and ``annotations/<split>/``.
        split: ``"training"`` or ``"validation"``.
        image_size: shorter side after resizing. ``crop=True`` then center-crops a square (training batches);
            ``crop=False`` keeps the aspect ratio (whole-image evaluation, non-square outputs).
        max_images: keep only the first N images.

    Shape:
        - sample["image"]: (3, H, W); sample["seg"]: (H, W) int64 in [0, 150) or 255
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "validation",
        image_size: int | None = 512,
        *,
        crop: bool = False,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split, self.image_size, self.crop = split, image_size, crop
        self.n_classes = ADE20K_N_CLASSES
        label_dir = self.root / "annotations" / split
        if not label_dir.is_dir():
            raise FileNotFoundError(
                f"expected ADE20K annotations in {label_dir} "
                "(layout: images/<split>/*.jpg, annotations/<split>/*.png)"
                ", found no such folder"
            )
        self.image_files = _list_images(self.root / "images" / split)
        self.label_files = {p.stem: label_dir / f"{p.stem}.png" for p in self.image_files}
        missing = [s for s, p in self.label_files.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"expected a label map {label_dir / (missing[0] + '.png')}, found none")
        self._limit(max_images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.image_files[index]
        if self.crop or self.image_size is None:
            image = load_image(path, self.image_size)
            label = load_label(self.label_files[path.stem], self.image_size)
        else:
            image = load_image(path)
            label = load_label(self.label_files[path.stem])
            height, width = image.shape[-2:]
            scale = self.image_size / min(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            image = F.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False, antialias=True
            )[0]
            label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
            image = image.clamp_(0, 1)
        # reduce_zero_label: 0 (other) -> ignored, 1..150 -> 0..149
        seg = torch.where(label == 0, torch.full_like(label, IGNORE_INDEX), label - 1)
        seg = seg.masked_fill(seg >= ADE20K_N_CLASSES, IGNORE_INDEX)
        return {"image": image, "seg": seg, "name": path.stem}


def open_probe_dataset(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    *,
    depth_dir: str | os.PathLike | None = None,
    image_list: str | os.PathLike | None = None,
    max_images: int | None = None,
) -> CocoStuff | DepthFolder:
    """A COCO-Stuff root (with depth if present) or, when it has no ``annotations/``, a depth folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"expected a dataset folder at {root}, found none")
    if (root / "annotations").is_dir():
        return CocoStuff(
            root, split, image_size, image_list=image_list, depth_dir=depth_dir, max_images=max_images
        )
    return DepthFolder(root, split, image_size, depth_dir=depth_dir, max_images=max_images)
