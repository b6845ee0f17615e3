"""Readers of COCO-Stuff, depth folders, ImageNet-style folders and ADE20K, on fixtures in real layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featup.eval.datasets import (
    ADE20K,
    COCOSTUFF27_CLASSES,
    COCOSTUFF_FINE_TO_COARSE,
    CocoStuff,
    DepthFolder,
    ImageFolder,
    coarse_labels,
    load_depth,
    load_image,
    load_label,
    open_probe_dataset,
)
from featup.eval.fixtures import make_ade20k, make_cocostuff, make_imagenet_folder


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {
        "coco": make_cocostuff(base / "coco", n_train=3, n_val=2),
        "imagenet": make_imagenet_folder(base / "imagenet", n_classes=3, n_train=2, n_val=2),
        "ade": make_ade20k(base / "ade", n_train=2, n_val=2),
    }


def test_coarse_mapping_matches_known_classes():
    assert len(COCOSTUFF_FINE_TO_COARSE) == 182 and len(COCOSTUFF27_CLASSES) == 27
    assert sorted(set(COCOSTUFF_FINE_TO_COARSE)) == list(range(27))
    fine = torch.tensor([0, 2, 17, 156, 123, 170, 181, 255])
    coarse = coarse_labels(fine)
    names = [COCOSTUFF27_CLASSES[c] if c != 255 else None for c in coarse.tolist()]
    # person, car, dog, sky-other, grass, wall-brick, wood (solid), unlabeled
    assert names == ["person", "vehicle", "animal", "sky", "plant", "wall", "solid", None]
    # the 12 thing groups take the 80 thing ids, the 15 stuff groups the 91 stuff ids
    assert max(COCOSTUFF_FINE_TO_COARSE[:91]) == 11 and min(COCOSTUFF_FINE_TO_COARSE[91:]) == 12


def test_coarse_mapping_rejects_bad_input():
    with pytest.raises(TypeError, match="integer"):
        coarse_labels(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        coarse_labels(torch.tensor([300]))
    assert coarse_labels(torch.tensor([200])).item() == 255  # unused fine ids are ignored


def test_cocostuff_reader(roots):
    ds = CocoStuff(roots["coco"], "val2017", 32)
    assert len(ds) == 2 and ds.has_depth
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["seg"].shape == (32, 32) and s["seg"].dtype == torch.int64
    assert set(s["seg"].unique().tolist()) <= {9, 11, 7, 23, 22, 18, 255}
    assert s["depth"].shape == (32, 32) and bool((s["depth"] > 0).all())
    fine = CocoStuff(roots["coco"], "val2017", None, coarse=False)[0]
    assert fine["image"].shape == (3, 48, 64)  # stored size kept
    assert set(fine["seg"].unique().tolist()) <= {0, 2, 17, 156, 123, 170, 255}


def test_depth_units_agree_between_npy_and_png(roots):
    train = CocoStuff(roots["coco"], "train2017", None)
    val = CocoStuff(roots["coco"], "val2017", None)
    assert train.depth_files[train.image_files[0].stem].suffix == ".npy"
    assert val.depth_files[val.image_files[0].stem].suffix == ".png"
    # sky is 80 (x 100) in both formats
    assert train[0]["depth"].max() == pytest.approx(8000, rel=1e-3)
    assert val[0]["depth"].max() == pytest.approx(8000, rel=1e-3)


def test_depth_folder_and_autodetect(tmp_path, roots):
    root = tmp_path / "depthonly"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "depth" / "val2017").mkdir(parents=True)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(root / "images" / "val2017" / "a.jpg")
    np.save(root / "depth" / "val2017" / "a.npy", np.arange(600, dtype=np.float32).reshape(20, 30) + 1)
    ds = open_probe_dataset(root, "val2017", 16)
    assert isinstance(ds, DepthFolder) and ds[0]["depth"].shape == (16, 16) and "seg" not in ds[0]
    assert isinstance(open_probe_dataset(roots["coco"], "val2017", 16), CocoStuff)
    (root / "images" / "val2017" / "b.jpg").write_bytes((root / "images" / "val2017" / "a.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="depth map for b.jpg"):
        DepthFolder(root, "val2017", 16)


def test_load_helpers_resize_and_crop(tmp_path):
    arr = np.zeros((10, 20), np.uint8)
    arr[:, 10:] = 7
    Image.fromarray(arr).save(tmp_path / "l.png")
    lab = load_label(tmp_path / "l.png", 10)
    assert lab.shape == (10, 10) and set(lab.unique().tolist()) == {0, 7}  # nearest: no blended classes
    d = np.linspace(1, 2, 200, dtype=np.float32).reshape(10, 20)
    np.save(tmp_path / "d.npy", d)
    assert torch.allclose(load_depth(tmp_path / "d.npy"), torch.from_numpy(d))
    assert load_depth(tmp_path / "d.npy", 5).shape == (5, 5)
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(tmp_path / "i.png")
    assert load_image(tmp_path / "i.png", 4).shape == (3, 4, 4)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(OSError, match="cannot read image"):
        load_image(tmp_path / "bad.jpg")


def test_imagenet_folder(roots):
    train = ImageFolder(roots["imagenet"], "train", 24)
    val = ImageFolder(roots["imagenet"], "val", 24, classes=train.classes)
    assert train.classes == ["n00000001", "n00000002", "n00000003"] and len(val) == 6
    labels = [val[i]["label"] for i in range(len(val))]
    assert labels == [0, 0, 1, 1, 2, 2]
    assert val[0]["image"].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="not among"):
        ImageFolder(roots["imagenet"], "val", 24, classes=["n00000001"])
    with pytest.raises(FileNotFoundError, match="ImageNet-style"):
        ImageFolder(roots["imagenet"], "test", 24)


def test_ade20k_reduce_zero_label_and_aspect(roots):
    val = ADE20K(roots["ade"], "validation", 32)
    s = val[0]
    assert s["image"].shape == (3, 32, 43)  # 48x64 -> shorter side 32, aspect kept
    assert s["seg"].shape == (32, 43)
    values = set(s["seg"].unique().tolist())
    assert 255 in values and values - {255} <= {0, 2, 4, 12, 20}  # ADE ids 1,3,5,13,21 shifted down
    raw = load_label(val.label_files[val.image_files[0].stem])
    assert int((raw == 0).sum()) > 0  # the fixture's "other" rows became 255
    crop = ADE20K(roots["ade"], "training", 32, crop=True)[0]
    assert crop["image"].shape == (3, 32, 32) and crop["seg"].shape == (32, 32)


def test_missing_layouts_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations"):
        CocoStuff(tmp_path, "val2017")
    with pytest.raises(FileNotFoundError, match="ADE20K"):
        ADE20K(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="dataset folder"):
        open_probe_dataset(tmp_path / "nope", "val2017", 32)
