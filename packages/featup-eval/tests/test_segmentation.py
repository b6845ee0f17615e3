"""End-to-end segmentation: SegFormer with each decoder upsampler, FLOP/parameter counts, `featup segment`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from featup.eval.cli import main
from featup.eval.datasets import ADE20K
from featup.eval.fixtures import make_ade20k
from featup.eval.segmentation import (
    DECODER_UPSAMPLERS,
    MIT_VARIANTS,
    SegFormer,
    count_gflops,
    count_params,
    evaluate_segmenter,
    run_segmentation,
    segmentation_table,
    train_segmenter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade20k(tmp_path_factory.mktemp("ade"), n_train=4, n_val=2)


@pytest.mark.parametrize("upsampler", list(DECODER_UPSAMPLERS))
def test_segformer_shapes_and_gradients_on_odd_sizes(upsampler):
    torch.manual_seed(0)
    model = SegFormer(7, variant="tiny", embed_dim=8, upsampler=upsampler)
    image = torch.rand(2, 3, 37, 53)
    out = model(image)
    assert out.shape == (2, 7, 37, 53)
    out.square().mean().backward()
    # end to end: the decoder upsampler's own parameters are trained with everything else
    for name, p in model.decode_head.upsamplers.named_parameters():
        assert p.grad is not None, name


def test_mit_b1_matches_the_table_2_baseline_size():
    # SegFormer-B1 with the bilinear decoder: 13.7M parameters in Table 2
    model = SegFormer(150, variant="b1")
    assert count_params(model) / 1e6 == pytest.approx(13.7, abs=0.1)
    assert set(MIT_VARIANTS) >= {"b0", "b1"}


def test_count_gflops_is_multiply_adds():
    conv = nn.Conv2d(3, 8, 1, bias=False)
    assert count_gflops(conv, (10, 10)) == pytest.approx(8 * 3 * 100 / 1e9)
    lin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    assert count_gflops(lin, (5, 6)) == pytest.approx(4 * 3 * 9 * 30 / 1e9)


def test_added_params_are_the_upsamplers():
    base = SegFormer(5, variant="tiny", embed_dim=8)
    for name in ("resize_conv", "carafe", "sapa", "jbu"):
        model = SegFormer(5, variant="tiny", embed_dim=8, upsampler=name)
        added = count_params(model) - count_params(base)
        assert added == count_params(model.decode_head.upsamplers) > 0
        assert count_gflops(model, (32, 32)) > count_gflops(base, (32, 32))


def test_training_resumes_to_the_same_weights(tmp_path, ade):
    train = ADE20K(ade, "training", 32, crop=True)

    def fresh():
        torch.manual_seed(0)
        return SegFormer(150, variant="tiny", embed_dim=8, upsampler="carafe")

    straight = train_segmenter(fresh(), train, 4, batch_size=2, lr=1e-3, progress=False)

    class Crashing(torch.utils.data.Dataset):  # the run dies while loading the third batch
        def __init__(self):
            self.reads = 0

        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            self.reads += 1
            if self.reads > 4:
                raise KeyboardInterrupt
            return train[i]

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(
            fresh(),
            Crashing(),
            4,
            batch_size=2,
            lr=1e-3,
            progress=False,
            checkpoint_path=tmp_path / "m",
            checkpoint_every=1,
        )
    resumed = fresh()
    train_segmenter(resumed, train, 4, batch_size=2, lr=1e-3, progress=False, checkpoint_path=tmp_path / "m")
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    with pytest.raises(ValueError, match="another model"):
        train_segmenter(
            SegFormer(150, variant="tiny", embed_dim=8),
            train,
            4,
            progress=False,
            checkpoint_path=tmp_path / "m",
        )


def test_evaluate_perfect_model(ade):
    val = ADE20K(ade, "validation", 32)

    class Oracle(nn.Module):  # logits read straight from the labels: every score must be 100
        n_classes = 150

        def forward(self, image):
            seg = self.labels.pop(0)
            return torch.nn.functional.one_hot(seg.clamp(max=149), 150).permute(0, 3, 1, 2).float()

    oracle = Oracle()
    oracle.labels = [val[i]["seg"][None] for i in range(len(val))]
    s = evaluate_segmenter(oracle, val, progress=False)
    assert s["miou"] == s["macc"] == s["aacc"] == pytest.approx(100.0)


def test_run_segmentation_and_table(tmp_path, ade):
    kw = dict(
        variant="tiny",
        embed_dim=8,
        crop_size=32,
        steps=2,
        batch_size=2,
        lr=1e-3,
        flops_size=64,
        progress=False,
    )
    res = run_segmentation(ade, tmp_path / "o", log=lambda s: None, **kw)
    assert list(res) == list(DECODER_UPSAMPLERS)
    for r in res.values():
        assert {"miou", "macc", "aacc", "params_m", "gflops"} <= set(r) and 0 <= r["aacc"] <= 100
    assert res["carafe"]["params_m"] > res["bilinear"]["params_m"]
    table = segmentation_table(res)
    assert table.splitlines()[0].startswith("| Metric") and "Bilinear" in table and "+" in table
    logged: list[str] = []
    assert run_segmentation(ade, tmp_path / "o", log=logged.append, **kw) == res and len(logged) == 5


def test_segment_command(tmp_path, ade, capsys):
    code = main(
        [
            "segment",
            str(ade),
            "--upsamplers",
            "jbu",
            "--variant",
            "tiny",
            "--embed-dim",
            "8",
            "--crop-size",
            "32",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--flops-size",
            "32",
            "--out",
            str(tmp_path / "o"),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "| Bilinear" in printed and "FeatUp (JBU)" in printed and "GFLOPs" in printed
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"bilinear", "jbu"}
    assert main(["segment", str(ade), "--upsamplers", "indexnet"]) == 2
    assert "unknown decoder upsampler" in capsys.readouterr().err


def test_fused_adaptive_conv_is_counted():
    from featup.kernels import adaptive_conv

    class Op(nn.Module):
        def forward(self, x):
            return adaptive_conv(x, torch.ones(1, x.shape[-2] - 2, x.shape[-1] - 2, 3, 3))

    assert count_gflops(Op(), (12, 10)) == pytest.approx(3 * 10 * 8 * 9 / 1e9)  # one multiply-add per tap
