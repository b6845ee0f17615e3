"""torchvision ResNet adapters against torchvision's own forward."""

from __future__ import annotations

import pytest
import torch
import torchvision

from featup.backbones import TorchvisionResNetBackbone, create_backbone


def _normalized(bb, image):
    return (image - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)


def test_resnet50_is_layer4_and_normalizes_once(built):
    bb = built("resnet50")
    ref_net = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in ref_net.state_dict().items() if not k.startswith("fc.")}
    bb.model.load_state_dict(state)  # the shared model gets the same random weights as ref_net
    ref_net.eval()
    extractor = torch.nn.Sequential(*list(ref_net.children())[:-2])  # torchvision's modules up to layer4
    image = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ours = bb(image)
        ref = extractor(_normalized(bb, image))
    assert ours.shape == (2, 2048, 2, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_deeplab_checkpoint_gives_the_segmentation_models_backbone(tmp_path):
    # torchvision's DeepLabV3 file holds backbone.*, classifier.* and aux_classifier.*: load it as published
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, aux_loss=True
    )
    seg.eval()
    torch.save(seg.state_dict(), tmp_path / "deeplab.pth")
    bb = create_backbone("deeplabv3_resnet50", weights=tmp_path / "deeplab.pth")
    image = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        ours = bb(image)
        ref = seg.backbone(_normalized(bb, image))["out"]
    assert ours.shape == (1, 2048, 6, 8) and bb.stride == 8
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("layer", "dim", "stride"), [(1, 256, 4), (2, 512, 8), (-2, 1024, 16), (4, 2048, 32)]
)
def test_resnet_stages(built, layer, dim, stride):
    shared = built("resnet50")  # a second adapter over the same network, reading another stage
    bb = TorchvisionResNetBackbone(shared.model, mean=shared.mean, std=shared.std, layer=layer)
    assert (bb.feat_dim, bb.stride) == (dim, stride)
    with torch.no_grad():
        assert bb(torch.rand(1, 3, 64, 96)).shape == (1, dim, 64 // stride, 96 // stride)


def test_batch_items_are_independent(built):
    # eval-mode batch norm: an item's features do not depend on the rest of the batch (train mode would)
    bb = built("resnet50")
    image = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(bb(image)[1:2], bb(image[1:2]), rtol=1e-4, atol=1e-4)


def test_natural_output_size_with_fit_none(built):
    shared = built("resnet50")
    bb = TorchvisionResNetBackbone(shared.model, mean=shared.mean, std=shared.std, fit="none")
    for h, w in [(97, 45), (65, 33)]:
        with torch.no_grad():
            assert tuple(bb(torch.rand(1, 3, h, w)).shape[-2:]) == bb.output_size(h, w)
    assert bb.output_size(200, 328) == (7, 11)
    with torch.device("meta"):
        assert create_backbone("deeplabv3_resnet50", fit="none").output_size(200, 328) == (25, 41)
