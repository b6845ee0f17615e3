"""The JBU shipped with featup-eval: offline loading, load_pretrained / CLI, the training script, the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_tools import load_tool
from PIL import Image

from featup.core import JBUStack
from featup.eval import pretrained
from featup.eval.cli import main
from featup.eval.photos import TRAIN_PHOTOS, load_photo
from featup.eval.pretrained import (
    PretrainedUnavailableError,
    load_pretrained,
    load_shipped_jbu,
    shipped_jbu_path,
)


def test_shipped_jbu_is_small_encoder_agnostic_and_documented():
    path = shipped_jbu_path("efficientnet_lite0")
    assert path.is_file() and path.stat().st_size < 1_000_000
    jbu = load_shipped_jbu("efficientnet_lite0")
    assert isinstance(jbu, JBUStack) and jbu.feat_dim is None and not jbu.training
    extra = json.loads(path.with_suffix(".json").read_text())["extra"]
    assert extra["command"].startswith("python tools/train_shipped_jbu.py")
    assert (
        extra["photos"] == list(TRAIN_PHOTOS)
        and extra["steps"] >= 1
        and extra["backbone"] == "efficientnet_lite0"
    )
    # encoder-agnostic: any channel count
    with torch.no_grad():
        out = jbu(torch.randn(1, 7, 4, 4), torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 7, 64, 64) and torch.isfinite(out).all()


def test_missing_shipped_jbu_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "shipped_jbu_path", lambda name: tmp_path / "none.safetensors")
    with pytest.raises(PretrainedUnavailableError, match="train_shipped_jbu.py"):
        load_shipped_jbu("efficientnet_lite0")
    with pytest.raises(ValueError, match="no shipped JBU"):
        shipped_jbu_path("dino16")


def test_load_pretrained_efficientnet_offline():
    model = load_pretrained("efficientnet_lite0", use_norm=False)
    assert model.model.feat_dim == 112 and model.model.stride == 16
    image = load_photo("chelsea", 64)[..., :64, :64]
    with torch.no_grad():
        out = model(image)
    assert out.shape == (1, 112, 64, 64) and torch.isfinite(out).all()


def test_upsample_cli_with_pretrained_efficientnet(tmp_path, capsys):
    img = (load_photo("coffee", 48)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "coffee.png")
    code = main(
        [
            "upsample",
            str(tmp_path / "coffee.png"),
            "--pretrained",
            "efficientnet_lite0",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    assert (tmp_path / "o" / "coffee.safetensors").is_file() and (tmp_path / "o" / "coffee.png").is_file()


def test_training_script_at_tiny_scale(tmp_path):
    tool = load_tool("train_shipped_jbu")
    out = tmp_path / "jbu"
    assert tool.main(["--steps", "1", "--size", "48", "--out", str(out), "--no-progress"]) == 0
    jbu = JBUStack.load(out.with_suffix(".safetensors"))
    extra = json.loads(out.with_suffix(".json").read_text())["extra"]
    assert jbu.feat_dim is None
    assert extra["steps"] == 1 and extra["window"] == 48 and extra["n_windows"] == 5 * len(TRAIN_PHOTOS)
    assert (
        extra["command"] == f"python tools/train_shipped_jbu.py --steps 1 --size 48 --out {out} --no-progress"
    )
    with pytest.raises(SystemExit):
        tool.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--consistency-strength", "1.5"])


def test_training_script_trains_the_asked_consistency_strength(tmp_path):
    tool = load_tool("train_shipped_jbu")
    out = tmp_path / "jbu0"
    argv = ["--steps", "1", "--size", "48", "--consistency-strength", "0", "--out", str(out), "--no-progress"]
    assert tool.main(argv) == 0
    jbu = JBUStack.load(out.with_suffix(".safetensors"))
    extra = json.loads(out.with_suffix(".json").read_text())["extra"]
    assert jbu.consistency_strength == 0.0 and extra["consistency_strength"] == 0.0


def test_real_demo_quick(tmp_path, capsys):
    code = main(["demo", "--quick", "--implicit-steps", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    png = Image.open(tmp_path / "featup-demo.png")
    assert png.width >= 4 * 64 and png.height >= 2 * 2 * 64  # two photos, two rows each
    rows = {r["method"] for r in json.loads((tmp_path / "featup-demo.json").read_text())["rows"]}
    assert {"bilinear", "jbu_shipped"} <= rows
    assert "| JBU shipped (featup-eval) |" in capsys.readouterr().out


def test_shipped_jbu_loads_unchanged_as_the_default_variant():
    """The shipped config records the layout flags; it loads without a warning, as the "default" variant,
    to the same outputs as that variant built directly with the shipped weights."""
    import warnings

    from featup.core import load_checkpoint
    from featup.eval.pretrained import shipped_jbu_path

    path = shipped_jbu_path("efficientnet_lite0")
    saved = json.loads(path.with_suffix(".json").read_text())["kwargs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jbu = load_shipped_jbu()
    # the saved options as saved; options added since take the values the file was made with
    added = {k: JBUStack.LEGACY_KWARGS[k] for k in jbu.config().keys() - saved.keys()}
    assert jbu.config() == {**saved, **added} and jbu.variant == "default"
    direct = JBUStack(variant="default").eval()
    direct.load_state_dict(load_checkpoint(path)[0], strict=True)
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(1, 7, 5, 6, generator=g), torch.rand(1, 3, 80, 96, generator=g)
    torch.testing.assert_close(jbu(x, image), direct(x, image), atol=0, rtol=0)
