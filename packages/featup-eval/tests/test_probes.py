"""Linear probes: metrics on hand-computed cases, the SSI loss, resumable export, `featup probe`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from featup.eval._confusion import confusion_matrix, segmentation_scores
from featup.eval.cli import main
from featup.eval.datasets import CocoStuff
from featup.eval.fixtures import TinyBackbone, make_cocostuff
from featup.eval.methods import MethodConfig
from featup.eval.probes import (
    LinearProbe,
    depth_errors,
    evaluate_probes,
    export_features,
    iter_exported,
    pool_depth,
    pool_labels,
    run_probes,
    scale_shift_align,
    ssi_loss,
    train_probe,
)

SPEC = "featup.eval.fixtures:tiny_backbone"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_cocostuff(tmp_path_factory.mktemp("coco"), n_train=8, n_val=4)


def test_confusion_matrix_known_case():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # the 255 pixel is skipped
    s = segmentation_scores(conf)
    # IoU: class0 1/(2+2-1)=1/3, class1 2/(2+3-2)=2/3, class2 1/(2+1-1)=1/2
    assert s["iou"] == pytest.approx([100 / 3, 200 / 3, 50])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert s["aacc"] == pytest.approx(4 / 6 * 100)
    assert s["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3 * 100)


def test_perfect_prediction_and_absent_classes():
    target = torch.randint(0, 4, (2, 9, 7))
    s = segmentation_scores(confusion_matrix(target, target, 6))
    assert s["miou"] == s["aacc"] == s["macc"] == pytest.approx(100.0)
    assert s["iou"][4] is None and s["iou"][5] is None  # never present, never predicted: left out
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(target[0], target, 6)
    with pytest.raises(ValueError, match=r"targets in \[0, 3\)"):
        confusion_matrix(target, target, 3)


def test_pool_labels_majority_and_ignore():
    seg = torch.tensor([[[1, 1, 2, 255], [1, 2, 255, 255]]])
    out = pool_labels(seg, (1, 2), n_classes=3)
    assert out.tolist() == [[[1, 255]]]  # left cell: 3 of 4 are class 1; right: 3 of 4 unlabeled
    depth = torch.tensor([[[1.0, 3.0, 0.0, 4.0]]])
    assert pool_depth(depth, (1, 2)).tolist() == [[[2.0, 4.0]]]  # the invalid 0 is left out


def test_scale_shift_alignment_and_ssi_loss():
    target = torch.rand(2, 5, 6) + 0.5
    pred = (target - 3.0) / 2.0  # an affine copy: perfectly explained
    assert torch.allclose(scale_shift_align(pred, target), target, atol=1e-5)
    assert float(ssi_loss(pred, target)) == pytest.approx(0.0, abs=1e-8)
    e = depth_errors(pred, target)
    assert e["sq_err"] == pytest.approx(0.0, abs=1e-8) and e["delta_ok"] == e["count"] == 60
    # hand case: target (1, 2, 3, 4) and a constant prediction: best fit is the mean 2.5
    t = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    e = depth_errors(torch.zeros_like(t), t)
    assert e["sq_err"] == pytest.approx(2.25 + 0.25 + 0.25 + 2.25)
    # delta = max(y/y*, y*/y): 2.5, 1.25, 1.2, 1.6 -> only 1.2 is below 1.25 (1.25 itself is not)
    assert e["delta_ok"] == 1 and e["count"] == 4


def test_ssi_loss_gradcheck():
    pred = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 4, dtype=torch.float64) + 1
    mask = torch.rand(2, 3, 4) > 0.2
    assert torch.autograd.gradcheck(lambda p: ssi_loss(p, target, mask), (pred,))


def test_export_is_resumable_and_guarded(tmp_path, coco):
    ds = CocoStuff(coco, "train2017", 32)
    bb = TinyBackbone()
    out = export_features(bb, ds, tmp_path / "f", batch_size=3, meta={"a": 1}, progress=False)
    shards = sorted(out.glob("shard_*.safetensors"))
    assert len(shards) == 3
    first = [s["feats"] for s in iter_exported(out)]
    assert first[0].shape == (3, 16, 4, 4) and first[2].shape == (2, 16, 4, 4)
    assert torch.allclose(first[0], bb(torch.stack([ds[i]["image"] for i in range(3)])), atol=1e-2)  # float16
    shards[1].unlink()
    mtime = shards[0].stat().st_mtime_ns
    export_features(bb, ds, out, batch_size=3, meta={"a": 1}, progress=False)
    assert shards[1].is_file() and shards[0].stat().st_mtime_ns == mtime  # only the missing shard rewritten
    assert all(torch.equal(a, s["feats"]) for a, s in zip(first, iter_exported(out)))
    shard = next(iter_exported(out))
    assert set(shard) == {"feats", "seg", "depth"} and shard["seg"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="another configuration"):
        export_features(bb, ds, out, batch_size=3, meta={"a": 2}, progress=False)


def test_probe_learns_and_frozen_probe_evaluates(tmp_path, coco):
    train = CocoStuff(coco, "train2017", 32)
    bb = TinyBackbone()
    export_features(bb, train, tmp_path / "f", batch_size=4, progress=False)
    seg = train_probe(
        tmp_path / "f", "seg", epochs=30, lr=1e-2, progress=False, checkpoint_path=tmp_path / "p"
    )
    depth = train_probe(tmp_path / "f", "depth", epochs=30, lr=1e-2, progress=False)
    assert isinstance(seg, LinearProbe) and seg.n_out == 27 and depth.n_out == 1
    # a finished checkpoint is reused as is
    again = train_probe(
        tmp_path / "f", "seg", epochs=30, lr=1e-2, progress=False, checkpoint_path=tmp_path / "p"
    )
    assert torch.equal(again.linear.weight, seg.linear.weight)
    val = CocoStuff(coco, "val2017", 32)

    def method(x):
        return torch.nn.functional.interpolate(bb(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    res = evaluate_probes(method, val, seg_probe=seg, depth_probe=depth, batch_size=3, progress=False)
    labels = torch.cat([val[i]["seg"].flatten() for i in range(len(val))])
    labels = labels[labels != 255]
    majority = float(torch.bincount(labels).max() / labels.numel() * 100)
    assert (
        res["n_images"] == 4 and res["accuracy"] > majority
    )  # better than always guessing the largest class
    assert 0 < res["delta125"] <= 1 and res["rmse"] > 0
    with pytest.raises(ValueError, match="at least one"):
        evaluate_probes(method, val)


def test_evaluation_resumes_from_partial_state(tmp_path, coco):
    val = CocoStuff(coco, "val2017", 32)
    bb = TinyBackbone()
    probe = LinearProbe(16, 27)
    calls = []

    def method(x):
        calls.append(x.shape[0])
        return torch.nn.functional.interpolate(bb(x), size=x.shape[-2:], mode="nearest")

    full = evaluate_probes(method, val, seg_probe=probe, batch_size=1, progress=False)
    state = tmp_path / "partial"
    # a run that stops after 2 of 4 images leaves its sums behind
    from featup.core.checkpoint import save_checkpoint
    from featup.eval.probes import ProbeScores

    part = ProbeScores(27)
    with torch.no_grad():
        for i in range(2):
            part.add_seg(probe(method(val[i]["image"][None])), val[i]["seg"][None])
            part.n_images += 1
    save_checkpoint(state.with_suffix(".safetensors"), *part.state())
    calls.clear()
    resumed = evaluate_probes(method, val, seg_probe=probe, batch_size=1, progress=False, state_path=state)
    assert calls == [1, 1] and resumed["miou"] == pytest.approx(full["miou"])
    assert not state.with_suffix(".safetensors").exists()


def test_run_probes_every_method_end_to_end(tmp_path, coco):
    cfg = MethodConfig(
        train_steps=2,
        batch_size=2,
        implicit_steps=2,
        dip_steps=2,
        n_jitters=2,
        strided_factor=2,
        large_factor=2,
    )
    res = run_probes(
        SPEC,
        coco,
        tmp_path / "out",
        methods="all",
        image_size=48,
        batch_size=4,
        probe_epochs=5,
        probe_lr=1e-2,
        max_val_images=2,
        method_cfg=cfg,
        progress=False,
        log=lambda s: None,
    )
    assert list(res) == [
        "lowres",
        "bilinear",
        "resize_conv",
        "dip",
        "strided",
        "large_image",
        "carafe",
        "sapa",
        "jbu",
        "implicit",
    ]
    for r in res.values():
        assert set(r) == {"n_images", "accuracy", "miou", "rmse", "delta125"} and r["n_images"] == 2
        assert 0 <= r["accuracy"] <= 100 and math.isfinite(r["rmse"])
    logged: list[str] = []
    again = run_probes(
        SPEC,
        coco,
        tmp_path / "out",
        methods="all",
        image_size=48,
        batch_size=4,
        probe_epochs=5,
        probe_lr=1e-2,
        max_val_images=2,
        method_cfg=cfg,
        progress=False,
        log=logged.append,
    )
    assert again == res and len(logged) == 10 and all("skipped" in s for s in logged)


def test_probe_command(tmp_path, coco, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "probe",
            str(coco),
            "--backbone",
            SPEC,
            "--image-size",
            "32",
            "--methods",
            "lowres,strided",
            "--strided-factor",
            "2",
            "--probe-epochs",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert (
        "| Low-res " in printed and "| Bilinear " in printed and "| Strided " in printed and "mIoU" in printed
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"lowres", "bilinear", "strided"}
    stored = json.loads((out / "probe_results.json").read_text())
    assert stored["results"]["bilinear"]["miou"] == pytest.approx(data["bilinear"]["miou"])


def test_probe_command_bad_input(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "missing"), "--backbone", SPEC]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featup probe: error:") and len(err.strip().splitlines()) == 1
    assert main(["probe", str(tmp_path), "--backbone", SPEC, "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("task", ["seg", "depth"])
def test_train_probe_resume_equals_uninterrupted_bitwise(tmp_path, coco, monkeypatch, task):
    """Issue 13 item 2: an interrupted and resumed probe training ends with exactly the uninterrupted
    weights. Before: the resume replayed one randperm per epoch from a shared generator (each epoch draws
    one per shard too) and restarted Adam from zero moments."""
    import featup.eval.probes as probes

    export_features(
        TinyBackbone(), CocoStuff(coco, "train2017", 32), tmp_path / "f", batch_size=3, progress=False
    )
    kw = dict(epochs=4, lr=1e-2, batch_size=2, seed=3, progress=False)
    full = train_probe(tmp_path / "f", task, checkpoint_path=tmp_path / "full", **kw)

    real = probes.iter_exported
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # dies at the start of the third epoch
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(probes, "iter_exported", interrupted)
    with pytest.raises(_Interrupt):
        train_probe(tmp_path / "f", task, checkpoint_path=tmp_path / "cut", **kw)
    monkeypatch.setattr(probes, "iter_exported", real)
    saved = json.loads((tmp_path / "cut.json").read_text())
    assert saved["extra"]["epoch"] == 2
    resumed = train_probe(tmp_path / "f", task, checkpoint_path=tmp_path / "cut", **kw)
    assert torch.equal(resumed.linear.weight, full.linear.weight)
    assert torch.equal(resumed.linear.bias, full.linear.bias)
    # the checkpoint with the optimizer state still loads as a plain probe
    loaded = LinearProbe.load(tmp_path / "cut.safetensors")
    assert torch.equal(loaded.linear.weight, full.linear.weight) and not loaded.training
