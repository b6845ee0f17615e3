"""DINOv3 (timm Eva architecture): shapes, layers, weights=PATH offline, pretrained=True's offline error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from featup.backbones import WeightsUnavailableError, create_backbone

TINY = {"model_kwargs": {"depth": 2}}


def test_tokens_grid_any_size_and_layers():
    torch.manual_seed(0)
    bb = create_backbone("dinov3_vits16", **TINY)
    assert (bb.feat_dim, bb.stride, bb.patch_size) == (384, 16, 16)
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        out = bb(x)
    assert out.shape == (1, 384, 3, 4) and torch.isfinite(out).all()
    first = create_backbone("dinov3_vits16", layer=0, weights=bb.model.state_dict(), **TINY)
    with torch.no_grad():
        early = first(x)
    assert early.shape == out.shape and not torch.allclose(early, out)
    with pytest.raises(ValueError, match="expected layer"):
        create_backbone("dinov3_vits16", layer=2, **TINY)


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    src = create_backbone("dinov3_vits16", **TINY)
    path = tmp_path / "dinov3_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = create_backbone("dinov3_vits16", weights=path, **TINY)
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))
    bad = {k: v for k, v in src.model.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match="missing keys"):
        create_backbone("dinov3_vits16", weights=bad, **TINY)


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"])
def test_pretrained_offline_names_the_file(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find offline
    with pytest.raises(WeightsUnavailableError, match=r"timm/vit_\w+_patch16_dinov3\.lvd1689m"):
        create_backbone(name, pretrained=True)
