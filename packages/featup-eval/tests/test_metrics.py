"""Metrics on hand-made cases whose answers are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from featup.eval.metrics import (
    LinearProbe,
    boundary_fscore,
    boundary_map,
    confusion_matrix,
    feature_cosine,
    feature_mse,
    miou,
    pixel_accuracy,
    segmentation_scores,
)


def test_feature_cosine_hand_cases():
    a = torch.zeros(1, 2, 1, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    a[0, :, 0, 1] = torch.tensor([1.0, 1.0])
    b = torch.zeros(1, 2, 1, 2)
    b[0, :, 0, 0] = torch.tensor([0.0, 3.0])  # orthogonal: 0
    b[0, :, 0, 1] = torch.tensor([2.0, 2.0])  # parallel: 1 (scale does not matter)
    assert feature_cosine(a, b) == pytest.approx(0.5)
    assert feature_cosine(a, -a) == pytest.approx(-1.0)


def test_feature_mse_hand_case():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])
    assert feature_mse(a, b) == pytest.approx((1 + 9) / 4)
    with pytest.raises(ValueError, match="one shape"):
        feature_mse(a, b[..., :1])


def test_confusion_miou_accuracy_known_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 2]])
    conf = confusion_matrix(pred, target, 3)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 3]])
    assert torch.equal(conf, expected)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 3 / (4 + 3 - 3) = 3/4
    assert miou(conf) == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert pixel_accuracy(conf) == pytest.approx(6 / 8)


def test_miou_ignores_absent_classes_and_ignored_pixels():
    target = torch.tensor([0, 0, 255, 1])
    pred = torch.tensor([0, 0, 1, 1])
    conf = confusion_matrix(pred, target, 4)  # 255 is ignored; classes 2, 3 never occur
    assert int(conf.sum()) == 3
    assert miou(conf) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no pixels"):
        miou(torch.zeros(3, 3, dtype=torch.long))


def test_perfect_prediction_scores_one():
    labels = torch.randint(0, 4, (2, 9, 11), generator=torch.Generator().manual_seed(0))
    s = segmentation_scores(labels, labels, 4)
    assert s == {"miou": 1.0, "accuracy": 1.0, "boundary_f": 1.0}


def test_boundary_map_and_fscore_hand_case():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :, 3:] = 1  # vertical boundary between columns 2 and 3
    b = boundary_map(target)
    assert b[0, :, 2].all() and int(b.sum()) == 6
    shifted = torch.zeros_like(target)
    shifted[:, :, 4:] = 1  # boundary one column to the right
    assert boundary_fscore(shifted, target, tolerance=1) == pytest.approx(1.0)
    assert boundary_fscore(shifted, target, tolerance=0) == pytest.approx(0.0)
    # a prediction with the right boundary plus a spurious one: precision 1/2, recall 1 -> F = 2/3
    extra = target.clone()
    extra[:, :, 0] = 2
    b_extra = boundary_map(extra)
    assert int(b_extra.sum()) == 12
    assert boundary_fscore(extra, target, tolerance=0) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_boundary_fscore_empty_cases():
    flat = torch.zeros(1, 5, 5, dtype=torch.long)
    split = flat.clone()
    split[:, 2:] = 1
    assert boundary_fscore(flat, flat) == 1.0
    assert boundary_fscore(flat, split) == 0.0
    with pytest.raises(ValueError):
        boundary_fscore(flat, split, tolerance=-1)


def test_linear_probe_learns_separable_classes_and_is_frozen():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 8, 8), generator=g)
    # features: a one-hot code of the class of each 2x2 cell (cells are pure by construction)
    coarse = labels[:, ::2, ::2]
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    feats = torch.nn.functional.one_hot(coarse, 3).permute(0, 3, 1, 2).float() * 4 - 2
    probe = LinearProbe(3, 3).fit(feats, labels, steps=200)
    assert not any(p.requires_grad for p in probe.parameters())
    assert not probe.training
    assert torch.equal(probe.predict(feats), coarse)
    up = torch.nn.functional.interpolate(feats, scale_factor=2, mode="nearest")
    assert segmentation_scores(probe.predict(up), labels, 3)["miou"] == 1.0
    with pytest.raises(ValueError, match="expected features"):
        probe(torch.zeros(1, 4, 2, 2))
    assert math.isfinite(feature_cosine(up, up))


@pytest.mark.parametrize("ignore", [255, -1, 3])
def test_linear_probe_ignores_labels_outside_the_classes(ignore):
    """Issue 13 item 3: ignore labels were clamped into class K-1 and trained as a real class.

    Every 2x2 cell is half class 1, half ``ignore``; the valid pixels all say class 1, so the probe must put
    (nearly) all its mass on class 1. Clamping made the target half class 1 / half class 2 (p ~ 0.5) or, for
    -1, half class 0.
    """
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 5, 3, 3, generator=g)
    labels = torch.full((4, 6, 6), 1, dtype=torch.long)
    labels[:, :, 1::2] = ignore
    probe = LinearProbe(5, 3).fit(feats, labels, steps=200)
    p1 = probe(feats).softmax(1)[:, 1]
    assert float(p1.min()) > 0.9


def test_linear_probe_fully_ignored_images_change_nothing():
    """Images whose pixels are all ignored contribute no loss: the fit equals the fit without them."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(5, 4, 4, 4, generator=g)
    labels = torch.randint(0, 3, (5, 8, 8), generator=g)
    labels[3:] = 255
    labels[4, :2] = -1
    a = LinearProbe(4, 3).fit(feats, labels, steps=50)
    b = LinearProbe(4, 3).fit(feats[:3], labels[:3], steps=50)
    torch.testing.assert_close(a.linear.weight, b.linear.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.linear.bias, b.linear.bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one pixel"):
        LinearProbe(4, 3).fit(feats, torch.full((5, 8, 8), 255), steps=1)
