"""The ``featup`` command end to end on tiny inputs, and its bad-input behaviour (one line, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from featup.eval.cli import main
from featup.eval.synthetic import synthetic_split


def _png(path: Path, h: int = 45, w: int = 58, seed: int = 0) -> Path:
    img = synthetic_split("eval", 1, (h, w), seed=seed).images[0]
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One quick synthetic demo run (it runs the quick benchmark); later tests reuse its trained JBU."""
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--synthetic", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_demo_writes_figure_json_and_checkpoint(demo_dir, capsys):
    png = Image.open(demo_dir / "featup-demo.png")
    assert png.width > 5 * png.height  # image | low-res | bilinear | JBU | implicit | ground truth
    data = json.loads((demo_dir / "featup-demo.json").read_text())
    methods = {r["method"]: r for r in data["rows"]}
    assert {"bilinear", "FeatUp JBU", "FeatUp implicit", "stride-1 extractor (upper bound)"} <= set(methods)
    assert (demo_dir / "featup-demo-jbu.safetensors").is_file()


def test_bench_quick_json_and_ordering(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--no-transfer", "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| method |" in text and "FeatUp JBU" in text
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    upper, bil = rows["stride-1 extractor (upper bound)"], rows["bilinear"]
    # the ground truth is its own best reconstruction, and the frozen probe does best on it
    assert upper["cosine"] == pytest.approx(1.0) and upper["mse"] == pytest.approx(0.0)
    assert upper["cosine"] > bil["cosine"] and upper["mse"] < bil["mse"]
    assert upper["miou"] > bil["miou"]
    assert upper["boundary_f"] > bil["boundary_f"]
    # every registered upsampler has a row, with honest training notes
    from featup.core import list_upsamplers

    for name in list_upsamplers():
        if name not in ("jbu", "implicit"):
            assert name in rows
    assert data["transfer"] == []


def test_bench_untrained_baselines_start_from_seeded_weights():
    from featup.eval.benchmark import _make_baseline

    def weights(seed: int) -> list[torch.Tensor]:
        torch.rand(7)  # whatever the global generator did before must not matter
        return [p.detach().clone() for p in _make_baseline("resize_conv", 8, seed).parameters()]

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _make_baseline("carafe", 8, 0)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is left alone


def test_upsample_bilinear_implicit_and_checkpoint(demo_dir, tmp_path, capsys):
    img = _png(tmp_path / "scene.png")
    out = tmp_path / "out"
    args = ["upsample", str(img), str(img), "--backbone", "synthetic_a", "--out", str(out), "--no-progress"]
    assert main([*args, "--upsampler", "bilinear", "--size", "56x70"]) == 0
    feats = load_file(out / "scene.safetensors")
    assert feats["lr_feats"].shape == (1, 32, 4, 5) and feats["hr_feats"].shape == (1, 32, 56, 70)
    assert (out / "scene-2.safetensors").is_file() and (out / "scene.png").is_file()

    assert main([*args[:2], *args[3:], "--upsampler", "implicit", "--steps", "2"]) == 0
    assert load_file(out / "scene.safetensors")["hr_feats"].shape == (1, 32, 45, 58)

    ckpt = demo_dir / "featup-demo-jbu.safetensors"
    assert main([*args[:2], *args[3:], "--checkpoint", str(ckpt)]) == 0  # jbu is implied by --checkpoint
    hr = load_file(out / "scene.safetensors")["hr_feats"]
    assert hr.shape == (1, 32, 45, 58) and torch.isfinite(hr).all()


def test_similarity_writes_heatmaps(demo_dir, tmp_path, capsys):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", seed=3)
    out = tmp_path / "sim"
    ckpt = demo_dir / "featup-demo-jbu.safetensors"
    code = main(
        [
            "similarity",
            str(a),
            "--point",
            "20,30",
            "--target",
            str(b),
            "--backbone",
            "synthetic_a",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    maps = load_file(out / "similarity.safetensors")
    assert maps["bilinear"].shape == (45, 58) and maps["featup"].shape == (45, 58)
    assert maps["featup"].max() <= 1 + 1e-5
    assert (out / "similarity.png").is_file()
    assert "best match" in capsys.readouterr().out
    # the query point compared with its own image is most similar to itself
    assert (
        main(
            [
                "similarity",
                str(a),
                "--point",
                "20,30",
                "--backbone",
                "synthetic_a",
                "--upsampler",
                "bilinear",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    self_map = load_file(out / "similarity.safetensors")["featup"]
    assert float(self_map[30, 20]) == pytest.approx(1.0, abs=1e-5)


def _bad(argv, capsys, expect: str):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expect in err, err


def test_bad_inputs_exit_2_with_one_line(demo_dir, tmp_path, capsys):
    img = _png(tmp_path / "ok.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(b"garbage")
    base = ["--backbone", "synthetic_a", "--out", str(tmp_path / "o"), "--no-progress"]
    _bad(
        ["upsample", str(tmp_path / "missing.png"), *base, "--upsampler", "bilinear"],
        capsys,
        "image not found",
    )
    _bad(["upsample", str(corrupt), *base, "--upsampler", "bilinear"], capsys, "cannot read image")
    _bad(
        [
            "upsample",
            str(img),
            "--backbone",
            "no_such_net",
            "--upsampler",
            "bilinear",
            "--out",
            str(tmp_path),
        ],
        capsys,
        "unknown backbone",
    )
    _bad(
        [
            "upsample",
            str(img),
            "--backbone",
            "synthetic_a",
            "--upsampler",
            "bilinear",
            "--out",
            str(blocker / "sub"),
        ],
        capsys,
        "cannot write",
    )
    _bad(["upsample", str(img), *base, "--checkpoint", str(bad_ckpt)], capsys, "checkpoint")
    _bad(
        ["upsample", str(img), *base, "--checkpoint", str(tmp_path / "nope.safetensors")], capsys, "not found"
    )
    _bad(["upsample", str(img), *base, "--upsampler", "jbu"], capsys, "--checkpoint")
    _bad(["upsample", str(img), *base, "--upsampler", "no_such_upsampler"], capsys, "unknown upsampler")
    # a checkpoint of another upsampler class
    _bad(
        [
            "upsample",
            str(img),
            *base,
            "--upsampler",
            "resize_conv",
            "--checkpoint",
            str(demo_dir / "featup-demo-jbu.safetensors"),
        ],
        capsys,
        "JBUStack",
    )
    _bad(["similarity", str(img), "--point", "500,2", *base, "--upsampler", "bilinear"], capsys, "inside")
    _bad(["similarity", str(img), "--point", "a,b", *base, "--upsampler", "bilinear"], capsys, "X,Y")
    _bad(["upsample", str(img), *base, "--upsampler", "bilinear", "--size", "big"], capsys, "HxW")
    _bad(["demo", str(img), "--out", str(tmp_path)], capsys, "--backbone")


def test_pretrained_offline_fails_fast_with_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEATUP_CACHE", str(tmp_path / "cache"))
    img = _png(tmp_path / "ok.png")
    _bad(
        ["upsample", str(img), "--pretrained", "dino16", "--out", str(tmp_path)],
        capsys,
        "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
        "dino16_jbu_stack_cocostuff.ckpt",
    )


def test_console_script_error_is_one_line(tmp_path):
    """The installed entry point: no traceback on bad input, exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "featup.eval.cli",
            "upsample",
            str(tmp_path / "missing.png"),
            "--backbone",
            "synthetic_a",
            "--upsampler",
            "bilinear",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "image not found" in proc.stderr
