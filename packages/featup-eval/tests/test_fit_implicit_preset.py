"""``featup fit-implicit --preset``: the default preset fits the residual model, ``paper`` the paper's."""

from __future__ import annotations

import numpy as np
from PIL import Image

from featup.core.checkpoint import load_checkpoint
from featup.eval.cli import main

TINY = ["--backbone", "synthetic_a", "--size", "56", "--quiet", "--steps", "1", "--pca-dim", "8"]


def test_fit_implicit_preset_selects_the_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((56, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    kwargs = {}
    for preset in ("default", "paper"):
        out = tmp_path / preset
        args = ["fit-implicit", str(tmp_path / "img.png"), *TINY, "--out", str(out)]
        assert main([*args, "--preset", preset] if preset == "paper" else args) == 0
        cfg = load_checkpoint(out / "img.safetensors")[1]
        assert cfg["extra"]["preset"] == preset
        kwargs[preset] = cfg["kwargs"]
    capsys.readouterr()
    assert kwargs["default"].get("residual") is True and kwargs["default"].get("dropout_mode") == "channel"
    assert "residual" not in kwargs["paper"] and "dropout_mode" not in kwargs["paper"]
