"""``--precision`` of ``featup train-jbu`` and ``featup fit-implicit`` end to end on tiny inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featup.core.checkpoint import load_checkpoint
from featup.core.implicit import ImplicitUpsampler
from featup.core.jbu import JBUStack
from featup.eval.cli import main

TINY = ["--backbone", "synthetic_a", "--size", "56", "--quiet"]
# autocast convolutions are several times slower than float32 on CPUs without native bfloat16, so the
# low-precision runs use the smallest input the stride-14 extractor takes and one jittered view
SMALL = ["--backbone", "synthetic_a", "--size", "28", "--n-jitters", "1", "--quiet"]


def _images(folder: Path, n: int) -> Path:
    """``n`` small striped PNGs with noise (56 x 64 px)."""
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:56, 0:64]
    for i in range(n):
        base = np.stack([(xx // (6 + i)) % 2, (yy // 7) % 2, (xx + yy) % 9 / 9], -1)
        arr = (0.7 * base + 0.3 * rng.random((56, 64, 3))) * 255
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_train_jbu_bfloat16_end_to_end_and_resume(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 1)
    ckpt = tmp_path / "run"
    args = ["train-jbu", "--images", str(imgs), *SMALL, "--batch-size", "1", "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--steps", "2", "--precision", "bfloat16"]) == 0
    assert "trained JBU upsampler" in capsys.readouterr().out
    state_cfg = load_checkpoint(ckpt / "train_state.safetensors")[1]
    assert state_cfg["precision"] == "bfloat16" and state_cfg["step"] == 2
    up = JBUStack.load(ckpt / "jbu_stack.safetensors")
    assert not up.training and all(p.dtype == torch.float32 for p in up.parameters())
    assert load_checkpoint(ckpt / "jbu_stack.safetensors")[1]["extra"]["precision"] == "bfloat16"
    # resuming in another precision is a one-line error naming the stored one; the run is left as it was
    assert main([*args, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision='bfloat16'" in err, err
    assert load_checkpoint(ckpt / "train_state.safetensors")[1]["step"] == 2
    # the same precision (here in the earlier spelling, still accepted) continues it
    assert main([*args, "--steps", "3", "--resume", "--precision", "bf16"]) == 0
    assert load_checkpoint(ckpt / "train_state.safetensors")[1]["step"] == 3


def test_fit_implicit_bfloat16_end_to_end(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 1)
    out = tmp_path / "implicit"
    fit = ["fit-implicit", str(imgs), *SMALL, "--steps", "2", "--pca-dim", "8"]
    assert main([*fit, "--out", str(out), "--precision", "bfloat16"]) == 0
    assert "fitted 1, skipped 0" in capsys.readouterr().out
    model = ImplicitUpsampler.load(out / "img0.safetensors")
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert load_checkpoint(out / "img0.safetensors")[1]["extra"]["precision"] == "bfloat16"
    assert not list((out / ".partial").glob("*"))


@pytest.mark.parametrize("cmd", ["train-jbu", "fit-implicit"])
def test_precision_choices(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "{float32,bfloat16,float16}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([cmd, "x", "--images", "x", "--out", "x", *TINY, "--precision", "float64"])
    assert exc.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err
