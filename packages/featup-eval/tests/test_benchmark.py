"""BenchConfig: the scene size must let every extractor's feature cells tile the scene (issue 13, item 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from featup.eval.benchmark import BenchConfig
from featup.eval.cli import main
from featup.eval.synthetic import EXTRACTOR_STRIDES, SyntheticExtractor


@pytest.mark.parametrize("cfg", [BenchConfig(), BenchConfig.quick()], ids=["default", "quick"])
def test_default_scene_size_is_a_multiple_of_every_stride(cfg):
    """At 84 px extractor B (stride 16) gave 5 cells covering 80 px: its cell centres drifted by 3.6 px."""
    for variant, stride in EXTRACTOR_STRIDES.items():
        assert SyntheticExtractor(variant).stride == stride
        for side in cfg.size:
            assert side % stride == 0, (variant, stride, cfg.size)


def test_default_scene_cells_tile_the_scene():
    """The low-res cells of both extractors cover exactly the scene (the premise of the scoring)."""
    h, w = BenchConfig().size
    img = torch.rand(1, 3, h, w)
    for variant in ("a", "b"):
        ext = SyntheticExtractor(variant)
        lr = ext(img)
        assert (lr.shape[-2] * ext.stride, lr.shape[-1] * ext.stride) == (h, w)


@pytest.mark.parametrize("size", [(84, 84), (112, 84), (56, 112), (0, 0)])
def test_misaligned_scene_size_is_rejected_with_sizes_and_strides(size):
    with pytest.raises(ValueError) as exc:
        BenchConfig(size=size)
    msg = str(exc.value)
    assert f"{size[0]}x{size[1]}" in msg and "14" in msg and "16" in msg and "112" in msg


def test_scene_size_check_follows_the_extractors_in_use():
    # without transfer only extractor A (stride 14) runs
    assert BenchConfig(size=(84, 42), transfer=False).size == (84, 42)
    with pytest.raises(ValueError, match="14"):
        BenchConfig(size=(84, 40), transfer=False)
    # replace() re-validates: switching transfer back on with an A-only size is caught
    cfg = BenchConfig(size=(84, 42), transfer=False)
    with pytest.raises(ValueError, match="extractor B: 16"):
        dataclasses.replace(cfg, transfer=True)


def test_bench_command_rejects_a_misaligned_scene_size(capsys, tmp_path):
    code = main(["bench", "--quick", "--scene-size", "84x84", "--json", str(tmp_path / "b.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "84x84" in err and "16" in err
    assert not (tmp_path / "b.json").exists()
