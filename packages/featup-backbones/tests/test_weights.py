"""Local weight files, the pretrained cache, and the offline error path."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from featup.backbones import (
    WeightsUnavailableError,
    create_backbone,
    get_backbone_config,
    read_state_dict,
)
from featup.backbones import weights as weights_mod

SHALLOW = {"depth": 2}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, so nothing downloaded earlier on this machine is found."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _outputs(bb, seed=3):
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return bb(image)


@pytest.mark.parametrize(("name", "suffix"), [("dinov2_vits14_reg", ".safetensors"), ("resnet50", ".pth")])
def test_local_weights_round_trip(built, tmp_path, name, suffix):
    source = built(name)  # ViTs with two blocks (conftest)
    kwargs = {} if name == "resnet50" else {"model_kwargs": SHALLOW}
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(11)  # another initialization: equality below needs the file's weights
    loaded = create_backbone(name, weights=path, **kwargs)
    torch.testing.assert_close(_outputs(loaded), _outputs(source), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_backbone_state_dict_and_wrapped_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("dino_vits16", model_kwargs=SHALLOW)
    # a Backbone's own state_dict (model.* keys), nested as Lightning does, saved by DDP (module.*)
    nested = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(nested, tmp_path / "nested.ckpt")
    loaded = create_backbone("dino_vits16", weights=tmp_path / "nested.ckpt", model_kwargs=SHALLOW)
    torch.testing.assert_close(_outputs(loaded), _outputs(source), rtol=0, atol=0)
    from_dict = create_backbone("dino_vits16", weights=source.model.state_dict(), model_kwargs=SHALLOW)
    torch.testing.assert_close(_outputs(from_dict), _outputs(source), rtol=0, atol=0)


def test_authors_dinov2_register_layout_loads(tmp_path):
    # the authors' *_reg4_pretrain.pth layout: register_tokens, mask_token, a class position in pos_embed that
    # timm folds into cls_token; written here from a timm model by inverting that conversion
    torch.manual_seed(0)
    source = create_backbone("dinov2_vits14_reg", model_kwargs=SHALLOW)
    state = dict(source.model.state_dict())
    pos0 = torch.randn(1, 1, 384)
    original = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original["register_tokens"] = state["reg_token"]
    original["cls_token"] = state["cls_token"] - pos0
    original["pos_embed"] = torch.cat([pos0, state["pos_embed"]], dim=1)
    original["mask_token"] = torch.zeros(1, 384)
    torch.save(original, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = create_backbone(
        "dinov2_vits14_reg", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth", model_kwargs=SHALLOW
    )
    torch.testing.assert_close(_outputs(loaded), _outputs(source), rtol=1e-5, atol=1e-5)


class _Payload:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a weight file"):
        create_backbone("resnet50", weights=tmp_path / "missing.safetensors")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        read_state_dict(tmp_path / "garbage.pth")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="missing keys: .*unexpected keys: foo"):
        create_backbone("resnet50", weights=tmp_path / "other.safetensors")
    torch.save({"epoch": 1}, tmp_path / "no_tensors.pth")
    with pytest.raises(ValueError, match="no tensors"):
        read_state_dict(tmp_path / "no_tensors.pth")


def test_shape_mismatch_is_reported(tmp_path):
    torch.manual_seed(0)
    small = create_backbone("dino_vits16", model_kwargs=SHALLOW)
    save_file(dict(small.model.state_dict()), str(tmp_path / "s.safetensors"))
    with pytest.raises(ValueError, match="do not fit backbone 'dino_vitb16'.*shape mismatches"):
        create_backbone("dino_vitb16", weights=tmp_path / "s.safetensors", model_kwargs=SHALLOW)


@pytest.mark.parametrize("name", ["dinov2_vitg14_reg", "clip_vitb16", "resnet50", "deeplabv3_resnet50"])
def test_offline_pretrained_fails_fast_with_instructions(empty_caches, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = get_backbone_config(name)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone(name, pretrained=True)
    assert time.monotonic() - start < 5.0  # and the giant model was never initialized
    message = str(info.value)
    assert cfg.weights.download_url in message
    assert f"weights='/path/to/{cfg.weights.filename}'" in message
    assert "HF_HUB_OFFLINE" in message


def test_unreachable_network_fails_within_the_timeout(empty_caches, monkeypatch):
    # HF_HUB_OFFLINE unset, and a connection attempt that hangs: the probe must give up on its own
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("FEATUP_NETWORK_TIMEOUT", "0.5")

    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="unreachable"):
        create_backbone("dino_vits16", pretrained=True)
    assert time.monotonic() - start < 3.0


def test_pretrained_uses_the_hf_cache_offline(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(5)
    source = create_backbone("dino_vits16", model_kwargs=SHALLOW)
    src = get_backbone_config("dino_vits16").weights
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}
    repo = empty_caches / "hf" / f"models--{src.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(dict(source.model.state_dict()), str(repo / "snapshots" / ("0" * 40) / src.hf_filename))
    loaded = create_backbone("dino_vits16", pretrained=True, model_kwargs=SHALLOW)
    torch.testing.assert_close(_outputs(loaded), _outputs(source), rtol=0, atol=0)


def test_pretrained_uses_the_torch_hub_cache_offline(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torchvision

    torch.manual_seed(6)
    net = torchvision.models.resnet50(weights=None)
    src = get_backbone_config("resnet50").weights
    target = empty_caches / "torch" / "hub" / "checkpoints" / src.filename
    target.parent.mkdir(parents=True)
    torch.save(net.state_dict(), target)  # the file torchvision publishes: a plain state dict with fc.*
    assert weights_mod.cached_weights_path(src) == target
    bb = create_backbone("resnet50", pretrained=True)
    torch.testing.assert_close(bb.model.layer1[0].conv1.weight, net.layer1[0].conv1.weight)


def test_reachability_probe_is_bounded():
    start = time.monotonic()
    assert weights_mod._reachable("unreachable.invalid", 0.5) is False
    assert time.monotonic() - start < 2.0


def test_unwrap_rejects_non_dicts():
    with pytest.raises(ValueError, match="expected a state dict"):
        weights_mod.unwrap_state_dict([torch.zeros(1)])
