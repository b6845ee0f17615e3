"""``featup train-jbu`` and ``featup fit-implicit`` end to end on tiny inputs, including under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load

from featup.core.checkpoint import load_checkpoint
from featup.core.implicit import ImplicitUpsampler
from featup.core.jbu import JBUStack
from featup.eval.cli import main

TINY = ["--backbone", "synthetic_a", "--size", "56", "--quiet"]


def _images(folder: Path, n: int, sub: str | None = None) -> Path:
    rng = np.random.default_rng(len(str(folder)) + n)
    target = folder / sub if sub else folder
    target.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 56 + 4 * i, 64
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx // (6 + i)) % 2, (yy // 7) % 2, (xx + yy) % 9 / 9], -1)
        arr = (0.7 * base + 0.3 * rng.random((h, w, 3))) * 255
        Image.fromarray(arr.astype(np.uint8)).save(target / f"img{i}.png")
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "featup.eval.cli",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def test_train_jbu_end_to_end_and_resume(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 3)
    ckpt, out = tmp_path / "run", tmp_path / "jbu.safetensors"
    args = ["train-jbu", "--images", str(imgs), *TINY, "--batch-size", "2", "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--steps", "2", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "trained JBU upsampler" in summary and "3 images" in summary and str(out) in summary
    up = JBUStack.load(out)
    assert not up.training
    _, cfg = load_checkpoint(out)
    assert cfg["extra"]["backbone"] == "synthetic_a" and cfg["extra"]["steps"] == 2
    assert load_checkpoint(ckpt / "train_state.safetensors")[1]["step"] == 2
    # the same folder again without --resume is refused rather than silently overwritten
    assert main([*args, "--steps", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume continues the stored run up to the new step count (in its precision, float32 here)
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(ckpt / "train_state.safetensors")[1]["step"] == 3
    assert load_checkpoint(ckpt / "jbu_stack.safetensors")[1]["extra"]["precision"] == "float32"
    assert (ckpt / "jbu_stack.safetensors").is_file()  # default --out: inside the checkpoint folder
    capsys.readouterr()

    # `featup upsample --tile N` with the trained stack: same features as untiled, computed tile by tile
    image = imgs / "img2.png"  # 64 x 64 px
    up_args = [
        "upsample",
        str(image),
        "--backbone",
        "synthetic_a",
        "--upsampler",
        "jbu",
        "--checkpoint",
        str(out),
    ]
    assert main([*up_args, "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    assert main([*up_args, "--out", str(tmp_path / "tiled"), "--tile", "16", "--no-progress"]) == 0
    whole = st_load((tmp_path / "whole" / "img2.safetensors").read_bytes())["hr_feats"]
    tiled = st_load((tmp_path / "tiled" / "img2.safetensors").read_bytes())["hr_feats"]
    assert whole.shape[-2:] == (64, 64)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)
    assert main([*up_args, "--out", str(tmp_path / "bad"), "--tile", "0"]) == 2


def test_train_jbu_torchrun_rank0_writes(tmp_path):
    imgs = _images(tmp_path / "imgs", 4)
    out = tmp_path / "jbu.safetensors"
    res = _torchrun(
        "train-jbu",
        "--images",
        str(imgs / "*.png"),
        *TINY,
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--out",
        str(out),
        "--checkpoint-dir",
        str(tmp_path / "run"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("trained JBU upsampler") == 1  # only rank 0 reports
    assert "x 2 process(es)" in res.stdout
    _, cfg = load_checkpoint(out)
    assert cfg["extra"]["world_size"] == 2
    JBUStack.load(out)


def test_fit_implicit_torchrun_sharding_and_restart(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 2)
    _images(tmp_path / "imgs", 1, sub="nested")
    out = tmp_path / "implicit"
    fit = [
        "fit-implicit",
        str(imgs),
        *TINY,
        "--steps",
        "2",
        "--n-jitters",
        "2",
        "--pca-dim",
        "8",
        "--out",
        str(out),
    ]
    res = _torchrun(*fit)
    assert res.returncode == 0, res.stderr[-2000:]
    # sorted images: img0, img1, nested/img0 -> rank 0 takes indices 0 and 2, rank 1 takes index 1
    assert "rank 0/2: fitted 2, skipped 0" in res.stdout
    assert "rank 1/2: fitted 1, skipped 0" in res.stdout
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["img0.safetensors", "img1.safetensors", "nested__img0.safetensors"]
    for name, index in (("img0", 0), ("img1", 1), ("nested__img0", 2)):
        model = ImplicitUpsampler.load(out / f"{name}.safetensors")
        assert not model.training
        assert load_checkpoint(out / f"{name}.safetensors")[1]["extra"]["index"] == index
    assert not list((out / ".partial").glob("*"))  # resumable states are removed once results exist
    # restart: everything done is skipped; a removed result is fitted again
    (out / "img1.safetensors").unlink()
    (out / "img1.json").unlink()
    assert main(fit) == 0  # single process: rank 0 of 1 owns every image
    assert "fitted 1, skipped 2 already done, of 3 images" in capsys.readouterr().out
    assert (out / "img1.safetensors").is_file()


def _fails(args: list[str], capsys, match: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs(tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 1)
    (tmp_path / "notes.txt").write_text("hi")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    tj = ["train-jbu", "--steps", "1"]
    _fails([*tj, "--images", str(tmp_path / "missing"), *TINY], capsys, "no images")
    _fails([*tj, "--images", str(tmp_path / "notes.txt"), *TINY], capsys, "expected an image file")
    _fails([*tj, "--images", str(imgs), "--backbone", "nope", "--no-pretrained"], capsys, "unknown backbone")
    _fails([*tj, "--images", str(imgs), *TINY, "--resume"], capsys, "--resume needs --checkpoint-dir")
    _fails([*tj, "--images", str(imgs), *TINY, "--batch-size", "0"], capsys, "--batch-size")
    _fails([*tj, "--images", str(bad), *TINY], capsys, "cannot read image")
    _fails(["train-jbu", "--steps", "0", "--images", str(imgs), *TINY], capsys, "--steps >= 1")
    _fails([*tj, "--images", str(imgs), *TINY, "--weights", str(a_file)], capsys, "takes no --weights")
    fi = ["fit-implicit", "--steps", "1"]
    _fails([*fi, str(imgs), *TINY, "--out", str(a_file)], capsys, "expected --out to be a folder")
    _fails([*fi, str(bad), *TINY, "--out", str(tmp_path / "o")], capsys, "cannot read image")
    dup = tmp_path / "dup"
    _images(dup, 1)
    Image.open(dup / "img0.png").save(dup / "img0.jpg")
    _fails([*fi, str(dup), *TINY, "--out", str(tmp_path / "o2")], capsys, "would both be saved")


@pytest.mark.parametrize("cmd", ["train-jbu", "fit-implicit"])
def test_help_lists_commands(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "--backbone" in capsys.readouterr().out


def test_no_uncertainty_reaches_training_and_is_part_of_the_run(tmp_path, capsys):
    """--no-uncertainty trains with a plain MSE (stored with the run); resuming without it is refused."""
    imgs = _images(tmp_path / "imgs", 2)
    ckpt = tmp_path / "run"
    args = ["train-jbu", "--images", str(imgs), *TINY, "--batch-size", "1", "--checkpoint-dir", str(ckpt)]
    assert main([*args, "--steps", "1", "--no-uncertainty"]) == 0
    capsys.readouterr()
    assert load_checkpoint(ckpt / "jbu_stack.safetensors")[1]["extra"]["uncertainty"] is False
    assert main([*args, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uncertainty" in err, err
    out = tmp_path / "implicit"
    fit = ["fit-implicit", str(imgs / "img0.png"), *TINY, "--steps", "1", "--pca-dim", "8"]
    assert main([*fit, "--out", str(out), "--no-uncertainty"]) == 0
    assert load_checkpoint(out / "img0.safetensors")[1]["extra"]["uncertainty"] is False
