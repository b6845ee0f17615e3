"""The real-photo benchmark: every measure on hand-made cases, windows, config, and a quick CLI run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from featup.eval.cli import main
from featup.eval.real_bench import (
    REAL_METHODS,
    RealBenchConfig,
    cam_faithfulness,
    eval_windows,
    held_out_cosine,
    measure_call,
    pooled_back_cosine,
    top1_agreement,
    training_windows,
)


def _field(c=5, size=40, seed=0):
    """A dense per-pixel feature field with structure at every scale (B=1)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    chans = [
        torch.sin(xx * f + p) * torch.cos(yy * f2)
        for f, f2, p in torch.rand(c, 3, generator=g, dtype=torch.float64) * 2
    ]
    return torch.stack(chans)[None] + 0.3


def test_pooled_back_cosine_is_one_for_cell_preserving_maps():
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    nearest = F.interpolate(lr, scale_factor=4, mode="nearest")
    assert pooled_back_cosine(nearest, lr) == pytest.approx(1.0, abs=1e-12)
    # a zero-mean pattern inside every cell changes pixels, not the cell averages
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(6, 8)
    assert pooled_back_cosine(nearest + 5 * pattern, lr) == pytest.approx(1.0, abs=1e-12)
    # a constant map: the mean cosine of every cell with that constant vector
    const = torch.ones_like(nearest)
    expected = F.cosine_similarity(lr, torch.ones_like(lr), dim=1).mean()
    assert pooled_back_cosine(const, lr) == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        pooled_back_cosine(nearest[..., :-1], lr)


@pytest.mark.parametrize("offset", [(0, 2), (3, 0), (2, 2), (1, 3)])
def test_held_out_cosine_is_one_for_the_true_dense_field(offset):
    stride, h, w = 4, 6, 7
    dense = _field(size=48)
    window = dense[..., : h * stride, : w * stride]  # the oracle knows every pixel of the unshifted window
    dy, dx = offset
    shifted = F.avg_pool2d(dense[..., dy : dy + h * stride, dx : dx + w * stride], stride)  # "the network"
    assert held_out_cosine(window, shifted, offset, stride) == pytest.approx(1.0, abs=1e-12)
    # nearest-neighbour enlargement of the unshifted cells cannot know what lies between them
    nearest = F.interpolate(F.avg_pool2d(window, stride), scale_factor=stride, mode="nearest")
    assert held_out_cosine(nearest, shifted, offset, stride) < 0.999


def test_held_out_cosine_uses_only_cells_inside_the_window():
    stride = 2
    hr = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
    hr[:, 0] = 1.0
    shifted = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    shifted[:, 0] = 1.0
    shifted[:, 1, 1, :] = 1e6  # the last row reaches past the window for dy > 0: it must be ignored
    assert held_out_cosine(hr, shifted, (1, 0), stride) == pytest.approx(1.0)
    assert held_out_cosine(hr, shifted, (0, 1), stride) < 0.9  # dy = 0 keeps the last row
    with pytest.raises(ValueError, match="offset"):
        held_out_cosine(hr, shifted, (2, 0), stride)
    with pytest.raises(ValueError, match="expected a"):
        held_out_cosine(hr[..., :3, :], shifted, (1, 0), stride)


def test_top1_agreement():
    a = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [5.0, 0.0, 0.0]])
    assert top1_agreement(a, b) == 0.75
    with pytest.raises(ValueError):
        top1_agreement(a, b[:2])


def _texture_classifier(x: torch.Tensor) -> torch.Tensor:
    """Class 0 is confident when the left half holds fine texture (blurring it away lowers the confidence)."""
    left = x[..., : x.shape[-1] // 2]
    energy = (left[..., :, 1:] - left[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    return torch.stack([20 * energy, torch.ones_like(energy)], 1).softmax(-1)


def test_cam_faithfulness_rewards_a_cam_on_the_evidence():
    h = w = 32
    img = torch.full((2, 3, h, w), 0.5)
    checker = ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2).float()
    img[..., : w // 2] = checker[:, : w // 2]
    right = torch.zeros(2, h, w)
    right[..., w // 2 :] = 1.0
    classes = torch.zeros(2, dtype=torch.long)
    good = cam_faithfulness(img, 1 - right, classes, _texture_classifier, sigma=2.0)
    bad = cam_faithfulness(img, right, classes, _texture_classifier, sigma=2.0)
    assert good["average_drop"] == pytest.approx(0.0, abs=1e-9) and good["average_increase"] == 0.0
    assert bad["average_drop"] > 50.0
    # a low-res CAM is enlarged to the image first
    assert cam_faithfulness(img, (1 - right)[:, ::8, ::8], classes, _texture_classifier, sigma=2.0) == good
    with pytest.raises(ValueError, match="one CAM"):
        cam_faithfulness(img, right[:1], classes, _texture_classifier)


def test_measure_call_reports_time_and_peak():
    import mmap

    def work():
        # 100 MB of fresh anonymous pages, each touched, alive at return: an allocator may serve a tensor from
        # freed memory that is still resident (in two full CI runs a 100 MB tensor read as a 0 MB peak)
        m = mmap.mmap(-1, 100 << 20)
        for i in range(0, len(m), mmap.PAGESIZE):
            m[i] = 1
        return m

    out, seconds, peak = measure_call(work)
    assert len(out) == 100 << 20 and seconds > 0
    if peak is not None:  # Linux with /proc/self/clear_refs
        assert peak > 80
    out.close()


def test_windows():
    labels, crops = eval_windows(("chelsea", "coffee"), 64, 32, mirror=True)
    assert labels == ["chelsea", "chelsea (mirror)", "coffee", "coffee (mirror)"]
    assert crops.shape == (4, 3, 96, 96) and torch.equal(crops[1], crops[0].flip(-1))
    train = training_windows(("rocket",), 48)
    assert train.shape == (5, 3, 48, 48) and not torch.equal(train[0], train[1])


def test_config_validation():
    assert RealBenchConfig().validate().eval_photos == ("chelsea", "coffee", "camera", "grace_hopper")
    for bad in (
        {"window": 100},
        {"methods": ("nearest", "magic")},
        {"offsets": ((0.0, 0.0),)},
        {"train_steps": -1},
    ):
        with pytest.raises(ValueError):
            RealBenchConfig(**bad).validate()


def test_bench_real_quick_cli(tmp_path, capsys):
    out = tmp_path / "real.json"
    code = main(
        [
            "bench",
            "--real",
            "--quick",
            "--methods",
            "nearest,bilinear,jbu_shipped",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["nearest", "bilinear", "jbu_shipped"]
    assert rows["nearest"]["pooled_cos_16"] == pytest.approx(1.0, abs=1e-6)
    assert rows["bilinear"]["pooled_cos_16"] < 1.0
    for r in rows.values():
        assert 0 < r["held_out_cos"] <= 1 and r["average_drop"] is not None and r["ms_per_window"] > 0
    assert "| nearest |" in capsys.readouterr().out
    assert set(REAL_METHODS) >= set(rows)


def test_bench_real_options_need_real(tmp_path, capsys):
    assert main(["bench", "--methods", "nearest", "--json", str(tmp_path / "x.json")]) == 2
    assert "--methods needs --real" in capsys.readouterr().err


def test_the_implicit_row_uses_fit_implicits_default_steps():
    from featup.core.implicit_fit import ImplicitFitConfig

    assert RealBenchConfig().implicit_steps == ImplicitFitConfig().steps
