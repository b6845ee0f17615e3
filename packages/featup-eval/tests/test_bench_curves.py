"""tools/bench_curves.py: quality-against-steps curves (the quick mode, the step grid, merging saved parts)."""

from __future__ import annotations

import json

import pytest
from eval_tools import load_tool
from PIL import Image


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_curves")


def test_step_grid(tool):
    assert tool.step_grid(2000) == [0, 25, 50, 100, 200, 400, 800, 1600, 2000]
    assert tool.step_grid(200) == [0, 25, 50, 100, 200]
    assert tool.step_grid(2) == [0, 2]
    with pytest.raises(ValueError, match="max-steps"):
        tool.step_grid(0)


@pytest.fixture(scope="module")
def quick(tool, tmp_path_factory):
    out = tmp_path_factory.mktemp("curves")
    result = tool.main(["--quick", "--json", str(out / "c.json"), "--plot", str(out / "c.png")])
    return result, out


def test_quick_writes_json_and_plot(quick):
    result, out = quick
    saved = json.loads((out / "c.json").read_text())
    assert saved["grid"] == result["grid"] == [0, 2]
    for part, keys in (("synthetic", ("syn_cosine", "syn_mse")), ("real", ("real_held_out", "real_pooled"))):
        assert set(saved[part]["fixed"]) == {
            "bilinear",
            "bicubic",
            "jbu_classic",
            "bicubic+bp",
            "jbu_classic+bp",
        }
        for method in ("jbu", "implicit"):
            assert set(saved[part]["curves"][method]) == {"0", "2"}
            for scores in saved[part]["curves"][method].values():
                assert set(scores) == set(keys)
    png = Image.open(out / "c.png")
    assert png.size[0] > 4 * png.size[1] / 2  # four panels side by side


def test_step_zero_is_the_safe_start(quick):
    """A fresh JBU stack is Kopf's JBU back-projected onto the features, and a fresh residual implicit model
    renders the back-projected bicubic upsampling of its (full-rank) PCA features: both score as the
    independently computed fixed rows, and clearly unlike the same upsamplers without the back-projection
    (so the tolerance discriminates)."""
    result, _ = quick
    for part, keys in (("synthetic", ("syn_cosine", "syn_mse")), ("real", ("real_held_out", "real_pooled"))):
        fixed, curves = result[part]["fixed"], result[part]["curves"]
        for key in keys:
            for method, start in (("jbu", "jbu_classic+bp"), ("implicit", "bicubic+bp")):
                ref = fixed[start][key]
                tol = 1e-3 * abs(ref) if key.endswith("mse") else 1e-4
                assert abs(curves[method][0][key] - ref) <= tol, (part, key, method)
            assert abs(fixed["jbu_classic"][key] - fixed["jbu_classic+bp"][key]) > 10 * tol, (part, key)


def test_merge_saved_parts(tool, quick, tmp_path, capsys):
    _, out = quick
    saved = json.loads((out / "c.json").read_text())
    syn = {k: v for k, v in saved.items() if k != "real"}
    real = {k: v for k, v in saved.items() if k != "synthetic"}
    (tmp_path / "s.json").write_text(json.dumps(syn))
    (tmp_path / "r.json").write_text(json.dumps(real))
    merged = tool.main(["--from-json", str(tmp_path / "s.json"), str(tmp_path / "r.json")])
    assert merged["real"]["curves"]["jbu"][2] == saved["real"]["curves"]["jbu"]["2"]
    assert "| jbu | 2 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="twice"):
        tool.merge([syn, syn])


def test_jbu_only_with_overrides(tool, tmp_path):
    """``--trained jbu`` skips the implicit fits; ``--jbu-overrides`` reaches ``train_jbu`` (a negative learning rate
    is refused there, so an invalid override fails) and the table and plot still come out."""
    out = tmp_path / "j.json"
    result = tool.main(
        [
            "--quick",
            "--parts",
            "synthetic",
            "--trained",
            "jbu",
            "--jbu-overrides",
            '{"lr": 0.01, "p_flip": 0}',
        ]
        + ["--json", str(out), "--plot", str(tmp_path / "j.png")]
    )
    assert set(result["synthetic"]["curves"]) == {"jbu"}
    assert "implicit" not in tool.format_table(result)
    assert (tmp_path / "j.png").exists()
    with pytest.raises(ValueError, match="lr"):
        tool.main(["--quick", "--parts", "synthetic", "--trained", "jbu", "--jbu-overrides", '{"lr": -1}'])
    for bad in (["--trained", "dip"], ["--jbu-overrides", "[1]"], ["--jbu-overrides", "{lr"]):
        with pytest.raises(SystemExit):
            tool.parse_args(["--quick", *bad])
