"""tools/bench_forward_builds.py: the argument checks and one tiny run against the installed build."""

from __future__ import annotations

import argparse
import json

import pytest
from eval_tools import load_tool

tool = load_tool("bench_forward_builds")


def test_a_build_must_be_label_and_a_directory_with_the_kernels(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="LABEL=PATH"):
        tool.parse_build("no-separator")
    with pytest.raises(argparse.ArgumentTypeError, match="featup/kernels"):
        tool.parse_build(f"old={tmp_path}")
    (tmp_path / "featup" / "kernels").mkdir(parents=True)
    (tmp_path / "featup" / "kernels" / "__init__.py").write_text("")
    assert tool.parse_build(f"old={tmp_path}") == ("old", str(tmp_path))
    assert tool.parse_build("now=installed") == ("now", "installed")


def test_duplicate_labels_are_refused():
    with pytest.raises(SystemExit):
        tool.main(["--build", "a=installed", "--build", "a=installed"])


def test_a_tiny_run_reports_each_build_and_channel_count(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = tool.main(
        [
            "--build",
            "x=installed",
            "--build",
            "y=installed",
            "--channels",
            "3",
            "5",
            "--size",
            "32",
            "--lr",
            "4",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = result["rows"]
    assert [(r["build"], r["channels"]) for r in rows] == [("x", 3), ("x", 5), ("y", 3), ("y", 5)]
    for r in rows:
        assert r["jbu_ms"] > 0 and r["bilinear_ms"] > 0
        assert r["ratio_range"][0] <= r["ratio_median"] <= r["ratio_range"][1]
    assert json.loads(out.read_text())["rows"] == rows
    assert "| x | 3 |" in capsys.readouterr().out
