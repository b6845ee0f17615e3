"""CAM faithfulness: A.D./A.I. on hand cases, CAM masks whose effect on confidence is known, `featup cam`."""

from __future__ import annotations

import json

import pytest
import torch

from featup.eval.cam import (
    MaxPoolClassifier,
    average_drop,
    average_increase,
    cam_mask,
    cam_masked_image,
    class_activation_map,
    evaluate_cam,
    gaussian_blur,
    run_cam,
    select_correct,
    train_classifier,
)
from featup.eval.cli import main
from featup.eval.datasets import ImageFolder
from featup.eval.fixtures import TinyBackbone, make_imagenet_folder
from featup.eval.methods import MethodConfig

SPEC = "featup.eval.fixtures:tiny_backbone"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), n_classes=3, n_train=6, n_val=3)


def test_average_drop_and_increase_hand_values():
    y = torch.tensor([0.5, 0.8, 0.4, 0.2])
    o = torch.tensor([0.25, 0.9, 0.4, 0.1])
    # drops: 0.25/0.5 = 0.5, 0 (rose), 0 (equal), 0.1/0.2 = 0.5 -> mean 0.25
    assert average_drop(y, o) == pytest.approx(25.0)
    assert average_increase(y, o) == pytest.approx(25.0)  # only the second rose; equal is not an increase
    assert average_drop(y, y) == 0.0 and average_increase(y, y) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        average_drop(torch.tensor([]), torch.tensor([]))


def test_cam_mask_keeps_exactly_half_with_deterministic_ties():
    cam = torch.rand(3, 7, 9)
    mask = cam_mask(cam)
    assert mask.shape == cam.shape and mask.sum((1, 2)).tolist() == [32, 32, 32]  # round(0.5 * 63)
    kept_min = torch.where(mask, cam, torch.inf).amin((1, 2))
    dropped_max = torch.where(mask, -torch.inf, cam).amax((1, 2))
    assert bool((kept_min >= dropped_max).all())
    flat = cam_mask(torch.zeros(1, 2, 4))
    assert flat.reshape(-1).tolist() == [True] * 4 + [False] * 4  # ties: earlier pixels first
    with pytest.raises(ValueError, match=r"keep in \[0, 1\]"):
        cam_mask(cam, 1.5)


def test_gaussian_blur_properties():
    const = torch.full((1, 3, 9, 11), 0.3)
    assert torch.allclose(gaussian_blur(const, 2.0), const, atol=1e-6)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1
    out = gaussian_blur(spike, 1.5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5) and out.max() < 0.1  # mass kept, peak spread
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.transpose(-1, -2))


def _scene():
    """ch0: an object square (right) over a faint left-to-right ramp; ch1: a distractor spike (left)."""
    image = torch.zeros(1, 3, 16, 16)
    image[0, 0] = torch.linspace(0, 0.05, 16)[None, :].expand(16, 16)
    image[0, 0, 6:10, 10:14] = 1.0
    image[0, 1, 8, 1] = 0.9
    clf = MaxPoolClassifier(3, 3)
    with torch.no_grad():
        clf.linear.weight.copy_(4 * torch.eye(3))
        clf.linear.bias.zero_()
    return image, clf


def test_cam_on_the_object_provably_raises_confidence():
    # identity features: the classifier scores each channel's maximum. The class-0 CAM ranks the object and
    # the right half first, so the kept half holds the object untouched and the blurred half the distractor:
    # the class-0 logit stays, the class-1 logit can only fall -> the class-0 confidence rises.
    image, clf = _scene()
    label = torch.tensor([0])
    y = clf(image).softmax(-1)[0, 0]
    cam = class_activation_map(image, clf, label)
    masked = cam_masked_image(image, cam, sigma=1.5)
    assert torch.equal(masked[0, 0, 6:10, 10:14], image[0, 0, 6:10, 10:14])
    o = clf(masked).softmax(-1)[0, 0]
    assert o > y
    assert average_increase(y[None], o[None]) == 100.0 and average_drop(y[None], o[None]) == 0.0


def test_inverted_cam_provably_lowers_confidence():
    # the reversed CAM keeps the left half (distractor intact) and blurs the object: the class-0 maximum falls
    image, clf = _scene()
    label = torch.tensor([0])
    y = clf(image).softmax(-1)[0, 0]
    masked = cam_masked_image(image, -class_activation_map(image, clf, label), sigma=1.5)
    assert masked[0, 0].max() < 1.0 and masked[0, 1].max() == pytest.approx(0.9)
    o = clf(masked).softmax(-1)[0, 0]
    assert o < y
    assert average_drop(y[None], o[None]) == pytest.approx(float((y - o).detach() / y.detach() * 100))


def test_evaluate_cam_orders_a_good_and_a_bad_cam():
    image, clf = _scene()
    dataset = [{"image": image[0], "label": 0, "name": "scene"}]
    selection = select_correct(lambda x: x, clf, dataset, progress=False)
    assert selection["indices"] == [0]
    good = evaluate_cam(lambda x: x, clf, lambda x: x, dataset, selection, sigma=1.5, progress=False)
    bad = evaluate_cam(lambda x: x, clf, lambda x: -x, dataset, selection, sigma=1.5, progress=False)
    assert good["average_increase"] == 100.0 and good["average_drop"] == 0.0
    assert bad["average_increase"] == 0.0 and bad["average_drop"] > 0.0
    # a low-res CAM is enlarged to the image before masking
    low = cam_masked_image(
        image, class_activation_map(image[..., ::4, ::4], clf, torch.tensor([0])), sigma=1.5
    )
    assert low.shape == image.shape


def test_classifier_learns_the_fixture(tmp_path, imagenet):
    train = ImageFolder(imagenet, "train", 32)
    val = ImageFolder(imagenet, "val", 32, classes=train.classes)
    bb = TinyBackbone()
    clf = train_classifier(
        bb,
        train,
        3,
        epochs=40,
        lr=1e-2,
        progress=False,
        checkpoint_path=tmp_path / "c",
        cache_path=tmp_path / "pool",
    )
    sel = select_correct(bb, clf, val, progress=False)
    assert len(sel["indices"]) >= 6  # at least 2/3 of the 9 validation images (chance: 1/3)
    again = train_classifier(bb, train, 3, epochs=40, progress=False, checkpoint_path=tmp_path / "c")
    assert torch.equal(again.linear.weight, clf.linear.weight)


def test_run_cam_end_to_end_and_resume(tmp_path, imagenet):
    cfg = MethodConfig(
        train_steps=2,
        batch_size=2,
        implicit_steps=2,
        dip_steps=2,
        n_jitters=2,
        strided_factor=2,
        large_factor=2,
    )
    kw = dict(
        methods="all",
        image_size=48,
        batch_size=4,
        classifier_epochs=30,
        classifier_lr=1e-2,
        max_images=3,
        method_cfg=cfg,
        progress=False,
    )
    res = run_cam(SPEC, imagenet, tmp_path / "out", log=lambda s: None, **kw)
    assert len(res) == 10
    for r in res.values():
        assert 0 <= r["average_drop"] <= 100 and 0 <= r["average_increase"] <= 100 and r["n_images"] == 3
    logged: list[str] = []
    assert run_cam(SPEC, imagenet, tmp_path / "out", log=logged.append, **kw) == res
    assert sum("skipped" in s for s in logged) == 10


def test_cam_command(tmp_path, imagenet, capsys):
    code = main(
        [
            "cam",
            str(imagenet),
            "--backbone",
            SPEC,
            "--image-size",
            "32",
            "--methods",
            "lowres",
            "--classifier-epochs",
            "20",
            "--classifier-lr",
            "0.01",
            "--max-images",
            "4",
            "--out",
            str(tmp_path / "o"),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "| Low-res " in printed and "| Bilinear " in printed and "A.D." in printed
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"lowres", "bilinear"}
    assert main(["cam", str(imagenet), "--backbone", SPEC, "--keep", "2"]) == 2
    assert "--keep" in capsys.readouterr().err
