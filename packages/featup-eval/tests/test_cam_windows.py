"""tools/cam_windows.py: the window set and its argument checks (the full run takes minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[3] / "tools" / "cam_windows.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("cam_windows", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_windows_are_real_distinct_crops_and_mirrors(tool):
    labels, images = tool.windows()
    assert images.shape == (72, 3, 224, 224) and len(labels) == len(set(labels)) == 72
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(images[1], images[0].flip(-1))  # each window is followed by its mirror image
    assert not torch.equal(images[0], images[2])


@pytest.mark.parametrize("argv", [["--methods", "implicit"], ["--methods", ""], ["--confidence", "1.5"]])
def test_bad_arguments_are_refused(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(argv)
