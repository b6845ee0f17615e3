"""Synthetic scenes and extractors: determinism, labels, shapes, the stride-1 / low-res relation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.eval.synthetic import CLASS_NAMES, SceneConfig, SyntheticExtractor, make_scene, synthetic_split


def test_scenes_are_seeded_and_splits_disjoint():
    a1 = synthetic_split("train", 3, (40, 52))
    a2 = synthetic_split("train", 3, (40, 52))
    b = synthetic_split("eval", 3, (40, 52))
    assert torch.equal(a1.images, a2.images) and torch.equal(a1.labels, a2.labels)
    assert a1.images.shape == (3, 3, 40, 52) and a1.labels.shape == (3, 40, 52)
    for i in range(3):
        for j in range(3):
            assert not torch.equal(a1.images[i], b.images[j])
    assert a1.images.min() >= 0 and a1.images.max() <= 1
    assert a1.labels.dtype == torch.int64 and int(a1.labels.max()) < len(CLASS_NAMES)
    with pytest.raises(ValueError, match="split"):
        synthetic_split("validation", 1)


def test_scenes_hold_several_classes_and_thin_structures():
    split = synthetic_split("train", 12, (96, 96))
    present = torch.bincount(split.labels.flatten(), minlength=len(CLASS_NAMES))
    assert (present > 0).all(), f"every class should occur in 12 scenes, got counts {present.tolist()}"
    # wires are thin: eroding their mask by one pixel in both directions removes most of it
    wire = (split.labels == CLASS_NAMES.index("wire")).float()[:, None]
    eroded = -F.max_pool2d(-wire, 5, stride=1, padding=2)
    assert eroded.sum() < 0.2 * wire.sum()


def test_color_does_not_give_away_the_class():
    """The mean color of an object is (nearly) independent of its class: a color-only classifier is poor."""
    split = synthetic_split("train", 40, (64, 64))
    means = []
    for c in range(1, 5):
        mask = split.labels == c
        means.append(torch.stack([split.images[:, k][mask].mean() for k in range(3)]))
    spread = torch.stack(means).std(0).max()
    assert spread < 0.08, f"class mean colors differ by {spread:.3f}: color would reveal the class"


def test_scene_size_validation():
    with pytest.raises(ValueError, match="16x16"):
        make_scene(0, SceneConfig(size=(8, 8)))


@pytest.mark.parametrize("variant, dim, stride", [("a", 32, 14), ("b", 48, 16)])
def test_extractor_contract(variant, dim, stride):
    ext = SyntheticExtractor(variant)
    assert ext.feat_dim == dim and ext.stride == stride and not ext.training
    assert not any(p.requires_grad for p in ext.parameters())
    img = synthetic_split("eval", 2, (45, 67)).images  # odd, non-square, not a multiple of the stride
    lr, hr = ext(img), ext.dense(img)
    assert lr.shape == (2, dim, 45 // stride, 67 // stride)
    assert hr.shape == (2, dim, 45, 67)
    # the low-res map is exactly the stride-1 map average-pooled by the stride
    torch.testing.assert_close(lr, F.avg_pool2d(hr, stride))
    # deterministic, and a function of the pixels of each image alone (batching changes nothing)
    torch.testing.assert_close(ext(img[1:]), lr[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected image"):
        ext.dense(img[:, :2])
    with pytest.raises(ValueError, match="at least"):
        ext(img[..., :8, :8])


def test_extractor_is_translation_equivariant_away_from_borders():
    ext = SyntheticExtractor("a")
    img = synthetic_split("eval", 1, (64, 64)).images
    shifted = torch.roll(img, shifts=(5, 3), dims=(2, 3))
    a = ext.dense(img)[..., 25:40, 25:40]
    b = ext.dense(shifted)[..., 30:45, 28:43]
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # Gaussian tails reach the border faintly


def test_extractor_is_not_flip_equivariant():
    """Oriented filters: a mirrored image does not give mirrored features (45 and 135 degree channels swap),
    which is why the benchmark trains without flip jitters (BenchConfig.p_flip = 0)."""
    ext = SyntheticExtractor("a")
    img = synthetic_split("eval", 2, (64, 64)).images
    flipped = ext.dense(img.flip(-1)).flip(-1)
    plain = ext.dense(img)
    gap = F.cosine_similarity(flipped, plain, dim=1).mean()
    # measured 0.959: as large a change as bilinear upsampling's error on the benchmark (cos 0.93)
    assert gap < 0.98, f"expected a flip to change the features, got mean cosine {float(gap):.4f}"


def test_extractors_differ_and_features_separate_classes():
    split = synthetic_split("eval", 4, (56, 56))
    fa = SyntheticExtractor("a").dense(split.images)
    fb = SyntheticExtractor("b").dense(split.images)
    assert fa.shape[1] != fb.shape[1]
    # class-discriminative: per-class mean features of extractor A are far apart relative to their spread
    labels = split.labels
    centers = torch.stack([fa.permute(0, 2, 3, 1)[labels == c].mean(0) for c in (1, 2, 3)])
    dist = torch.cdist(centers, centers)
    assert dist[~torch.eye(3, dtype=torch.bool)].min() > 0.5
