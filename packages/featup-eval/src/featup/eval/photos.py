"""Real photographs that ship inside installed wheels, with a fixed training / evaluation split. Offline.

The photos are read from the package folders of scikit-image (``skimage/data/``) and matplotlib
(``mpl-data/sample_data/``), never fetched; a missing package raises :class:`PhotoUnavailableError` naming it.

The split is fixed (never random) so every number measured on it is reproducible:

- **evaluation** (``EVAL_PHOTOS``): ``chelsea`` (a cat), ``coffee`` (a cup of coffee), ``camera`` (a
  cameraman with a tripod, grey-scale) and ``grace_hopper`` (a portrait in uniform): single-object photos on
  which EfficientNet-Lite0's top-1 class is right and confident on a centred 224 px window ("Egyptian cat",
  "espresso", "tripod", "bow tie"), as CAM faithfulness needs (on scene photos with a weak top-1 every
  upsampler's Average Drop was about 98%).
- **training** (``TRAIN_PHOTOS``): ``astronaut``, ``rocket``, ``motorcycle_left``, ``motorcycle_right`` (a
  stereo pair: both on the training side, so no near-duplicate crosses the split), ``hubble_deep_field``,
  ``retina``, plus the grey-scale photos ``coins``, ``brick``, ``grass``, ``gravel`` (read as RGB), which add
  real textures.

No photo is in both lists.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EVAL_PHOTOS",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "Photo",
    "PhotoUnavailableError",
    "center_crop",
    "load_photo",
    "load_photos",
    "photo_names",
    "photo_path",
]


class PhotoUnavailableError(RuntimeError):
    """The package that ships a photo is not installed (or its data folder lacks the file)."""


@dataclass(frozen=True)
class Photo:
    """A photo inside an installed package.

    Attributes:
        package: importable name of the package that ships it.
        relpath: path inside that package's folder.
        pip_name: what to ``pip install`` when the package is missing.
        description: one line on what it shows.
    """

    package: str
    relpath: str
    pip_name: str
    description: str


def _sk(file: str, description: str) -> Photo:
    return Photo("skimage", f"data/{file}", "scikit-image", description)


#: every bundled photo by name
PHOTOS: dict[str, Photo] = {
    "astronaut": _sk("astronaut.png", "Eileen Collins, portrait with a flag (512x512)"),
    "chelsea": _sk("chelsea.png", "Chelsea the cat (300x451)"),
    "coffee": _sk("coffee.png", "a cup of coffee on a saucer (400x600)"),
    "grace_hopper": Photo(
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "matplotlib",
        "Grace Hopper in uniform (600x512)",
    ),
    "rocket": _sk("rocket.jpg", "a rocket on the launch pad (427x640)"),
    "motorcycle_left": _sk("motorcycle_left.png", "a motorcycle, left stereo view (500x741)"),
    "motorcycle_right": _sk("motorcycle_right.png", "a motorcycle, right stereo view (500x741)"),
    "hubble_deep_field": _sk("hubble_deep_field.jpg", "galaxies, Hubble deep field (872x1000)"),
    "retina": _sk("retina.jpg", "a human retina (1411x1411)"),
    "camera": _sk("camera.png", "a cameraman, grey-scale (512x512)"),
    "coins": _sk("coins.png", "Greek coins, grey-scale (303x384)"),
    "brick": _sk("brick.png", "a brick wall, grey-scale (512x512)"),
    "grass": _sk("grass.png", "grass, grey-scale (512x512)"),
    "gravel": _sk("gravel.png", "gravel, grey-scale (512x512)"),
}

#: the evaluation photos (benchmarks, the demo's panels)
EVAL_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "camera", "grace_hopper")
#: the training photos (the shipped JBU, learned baselines)
TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "retina",
    "coins",
    "brick",
    "grass",
    "gravel",
)

_SPLITS = {"train": TRAIN_PHOTOS, "eval": EVAL_PHOTOS, "all": TRAIN_PHOTOS + EVAL_PHOTOS}


def photo_names(split: str = "eval") -> tuple[str, ...]:
    """Names of the ``"train"``, ``"eval"`` or ``"all"`` photos, in their fixed order.

    Raises:
        ValueError: an unknown split.
    """
    if split not in _SPLITS:
        raise ValueError(f"expected split in {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def _package_dir(package: str, pip_name: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PhotoUnavailableError(
            f"the photos of {package!r} need the package {pip_name!r}, which is not installed: "
            f"pip install {pip_name}"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    if not locations:
        raise PhotoUnavailableError(f"cannot locate the folder of the installed package {package!r}")
    return Path(locations[0])


def photo_path(name: str) -> Path:
    """Path of a bundled photo inside its installed package (nothing is downloaded).

    Raises:
        ValueError: an unknown name.
        PhotoUnavailableError: its package is not installed or lacks the file.
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; expected one of {sorted(PHOTOS)}")
    photo = PHOTOS[name]
    path = _package_dir(photo.package, photo.pip_name) / photo.relpath
    if not path.is_file():
        raise PhotoUnavailableError(
            f"photo {name!r} is missing from the installed {photo.pip_name} ({path}); "
            f"reinstall it: pip install --force-reinstall {photo.pip_name}"
        )
    return path


def load_photo(name: str, short_side: int | None = None) -> torch.Tensor:
    """A bundled photo as RGB in [0, 1], optionally resized (antialiased) so its shorter side is ``short_side``.

    Grey-scale photos are repeated over the three channels; an alpha channel is dropped.

    Shape:
        - output: (1, 3, H, W) float32

    Raises:
        ValueError: unknown name or ``short_side`` < 1.
        PhotoUnavailableError: the package is missing.
    """
    from PIL import Image

    if short_side is not None and int(short_side) < 1:
        raise ValueError(f"expected short_side >= 1 or None, got {short_side}")
    with Image.open(photo_path(name)) as im:
        rgb = im.convert("RGB")
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    image = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    if short_side is not None:
        h, w = image.shape[-2:]
        scale = int(short_side) / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
            image = image.clamp(0, 1)
    return image


def center_crop(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centred ``size`` = (H, W) window of ``image`` (real pixels: no padding, no resizing).

    Shape:
        - image: (B, C, H0, W0) with H0 >= H and W0 >= W
        - output: (B, C, H, W)

    Raises:
        ValueError: the window does not fit.
    """
    h, w = (int(s) for s in size)
    h0, w0 = image.shape[-2:]
    if h < 1 or w < 1 or h > h0 or w > w0:
        raise ValueError(f"expected a crop of at most {h0}x{w0} and at least 1x1, got {h}x{w}")
    top, left = (h0 - h) // 2, (w0 - w) // 2
    return image[..., top : top + h, left : left + w]


def load_photos(split: str = "eval", size: int = 224) -> torch.Tensor:
    """The photos of a split, each resized to shorter side ``size`` and centre-cropped to ``size`` x ``size``.

    Shape:
        - output: (N, 3, size, size)
    """
    return torch.cat([center_crop(load_photo(n, size), (size, size)) for n in photo_names(split)])
