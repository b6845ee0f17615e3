"""The bundled real photos: fixed disjoint split, offline loading, clear errors."""

from __future__ import annotations

import pytest
import torch

from featup.eval import photos
from featup.eval.photos import (
    EVAL_PHOTOS,
    PHOTOS,
    TRAIN_PHOTOS,
    PhotoUnavailableError,
    center_crop,
    load_photo,
    load_photos,
    photo_names,
    photo_path,
)


def test_split_is_fixed_and_disjoint():
    assert set(EVAL_PHOTOS).isdisjoint(TRAIN_PHOTOS)
    assert set(EVAL_PHOTOS) | set(TRAIN_PHOTOS) == set(PHOTOS)
    assert photo_names("eval") == EVAL_PHOTOS and photo_names("train") == TRAIN_PHOTOS
    # the stereo pair stays on one side
    assert {"motorcycle_left", "motorcycle_right"} <= set(TRAIN_PHOTOS)
    with pytest.raises(ValueError, match="expected split"):
        photo_names("test")


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_every_photo_loads_from_its_package(name):
    path = photo_path(name)
    assert path.is_file() and PHOTOS[name].relpath.split("/")[-1] == path.name
    img = load_photo(name, short_side=64)
    assert img.dtype == torch.float32 and img.shape[:2] == (1, 3) and min(img.shape[-2:]) == 64
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.01


def test_native_size_and_grey_scale_as_rgb():
    chelsea = load_photo("chelsea")
    assert chelsea.shape == (1, 3, 300, 451)
    camera = load_photo("camera")
    assert torch.equal(camera[:, 0], camera[:, 1]) and torch.equal(camera[:, 1], camera[:, 2])


def test_load_photos_and_center_crop():
    x = load_photos("eval", 96)
    assert x.shape == (len(EVAL_PHOTOS), 3, 96, 96)
    img = torch.arange(2 * 5 * 7, dtype=torch.float32).view(1, 2, 5, 7)
    crop = center_crop(img, (3, 3))
    assert torch.equal(crop, img[..., 1:4, 2:5])
    with pytest.raises(ValueError, match="expected a crop"):
        center_crop(img, (6, 3))


def test_errors_name_the_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="unknown photo"):
        photo_path("lena")
    with pytest.raises(ValueError, match="short_side"):
        load_photo("chelsea", short_side=0)
    monkeypatch.setitem(
        photos.PHOTOS, "ghost", photos.Photo("featup_no_such_pkg", "data/x.png", "no-such-pkg", "absent")
    )
    with pytest.raises(PhotoUnavailableError, match="pip install no-such-pkg"):
        photo_path("ghost")
    monkeypatch.setitem(
        photos.PHOTOS, "lost", photos.Photo("skimage", "data/not_there.png", "scikit-image", "x")
    )
    with pytest.raises(PhotoUnavailableError, match="missing from the installed scikit-image"):
        photo_path("lost")
