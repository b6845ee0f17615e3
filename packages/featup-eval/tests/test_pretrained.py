"""load_pretrained and hubconf: offline behaviour, local original checkpoints, eval mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from featup.eval.pretrained import PretrainedUnavailableError, load_pretrained

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEATUP_CACHE", str(tmp_path / "cache"))


def test_offline_fails_fast_naming_url_and_local_option():
    with pytest.raises(PretrainedUnavailableError) as info:
        load_pretrained("dinov2")
    msg = str(info.value)
    assert "pretrained/dinov2_jbu_stack_cocostuff.ckpt" in msg and "checkpoint=PATH" in msg
    with pytest.raises(PretrainedUnavailableError, match="no_norm/vit_jbu_stack_cocostuff.ckpt"):
        load_pretrained("vit", use_norm=False)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown pretrained model"):
        load_pretrained("dino17")
    with pytest.raises(ValueError, match="use_norm"):
        load_pretrained("maskclip", use_norm=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained("dino16", checkpoint="/no/such/file.ckpt")


def test_local_original_checkpoint_is_loaded_in_eval_mode(tmp_path):
    from featup.core import JBUStack

    ref = JBUStack(384, variant="original")
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    # the original Lightning layout: backbone keys under model.*, upsampler keys under upsampler.*
    state = {f"upsampler.{k}": v for k, v in ref.state_dict().items()}
    state["model.dummy"] = torch.zeros(1)
    path = tmp_path / "dino16_jbu_stack_cocostuff.ckpt"
    torch.save({"state_dict": state}, path)
    model = load_pretrained("dino16", checkpoint=path, pretrained=False)
    assert not model.training and not model.upsampler.training and not model.model.training
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.upsampler.state_dict()[k], v)
    image = torch.rand(1, 3, 48, 64)
    with torch.inference_mode():
        out = model(image)
        lr = model.model(image)
    assert lr.shape == (1, 384, 3, 4) and out.shape == (1, 384, 48, 64)
    # use_norm: the backbone's features are LayerNormed over channels
    torch.testing.assert_close(lr.mean(1), torch.zeros(1, 3, 4), atol=1e-4, rtol=0)


def test_hubconf_entry_points():
    spec = importlib.util.spec_from_file_location("featup_hubconf", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    for name in ("dino16", "dinov2", "clip", "maskclip", "vit", "resnet50"):
        assert callable(getattr(hub, name))
    model = hub.dino16(pretrained=False, use_norm=False)
    assert not model.training and model.upsampler.feat_dim == 384
    with pytest.raises(PretrainedUnavailableError, match="dino16_jbu_stack_cocostuff.ckpt"):
        hub.dino16()
