"""Every evaluation path keeps its tensors on the caller's device (issue 13 item 5, issue 16 item 1).

Without a GPU the ``meta`` stand-in of :mod:`featup.eval.devicecheck` plays the accelerator: tensors put there
report ``meta`` but hold real values, and every operator mixing them with a CPU tensor is recorded (where it
would fail on CUDA). With CUDA present the same tests also run on ``cuda``.
"""

from __future__ import annotations

import pytest
import torch

from featup.eval.devicecheck import OnDevice, device_check, real
from featup.eval.fixtures import TinyBackbone
from featup.eval.metrics import boundary_fscore

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(device: str, t: torch.Tensor) -> torch.Tensor:
    return t.to(device)


def _assert_on(t: torch.Tensor, device: str) -> None:
    assert t.device.type == device, f"expected a result on {device}, got {t.device}"


def test_device_check_records_mixing_and_only_mixing():
    with device_check("meta") as chk:
        x = torch.rand(2, 3).to("meta")
        y = (x * 2 + torch.tensor(1.0)).sum()  # a 0-dim CPU scalar mixes with any device, as in PyTorch
        assert isinstance(x, OnDevice) and float(y) == pytest.approx(float(real(x).mul(2).add(1).sum()))
        back = x.cpu()  # an explicit crossing is fine
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        z = torch.zeros(2, 3, device=x.device)
        assert isinstance(z, OnDevice)
    assert chk.mixed == []
    with device_check("meta") as chk:
        x = torch.rand(2, 3).to("meta")
        _ = x + torch.rand(2, 3)
        _ = torch.randn(3, generator=torch.Generator().manual_seed(0), device="meta")
    ops = [m.op for m in chk.mixed]
    assert ops == ["aten.add.Tensor", "aten.randn.generator"], chk.report()


@pytest.mark.parametrize("device", DEVICES)
def test_boundary_fscore_on_device(device):
    """The tolerance disk was built on the CPU: conv2d(device mask, CPU disk)."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (2, 20, 24), generator=g)
    target = torch.randint(0, 3, (2, 20, 24), generator=g)
    expected = boundary_fscore(pred, target, tolerance=2)
    with device_check(device) as chk:
        got = boundary_fscore(_on(device, pred), _on(device, target), tolerance=2)
    assert chk.mixed == [], chk.report()
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_dip_on_device(device):
    """PCA buffers, network, noise, downsampler and head were created on the CPU whatever the image's device."""
    from featup.eval.methods import fit_dip

    image = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(n_jitters=2, pca_dim=4, kernel_size=5, width=8, depth=2, progress=False)
    with device_check(device) as chk:
        bb = TinyBackbone(dim=8).to(device)
        up = fit_dip(bb, _on(device, image), 2, **kw)
        out = up(bb(_on(device, image)), _on(device, image))
    assert chk.mixed == [], chk.report()
    _assert_on(out, device)
    assert out.shape == (1, 8, 24, 32)
    if device == "meta":  # the stand-in computes on the CPU: the same numbers as a CPU fit
        ref = fit_dip(TinyBackbone(dim=8), image, 2, **kw)
        torch.testing.assert_close(real(out), ref(TinyBackbone(dim=8)(image), image))


# --------------------------------------------------------------------------------------------------------
# whole pipelines: every method of Table 1, the CAM and segmentation runs, on the device they are given

SPEC = "featup.eval.fixtures:tiny_backbone"
# one method of each kind: plain resize, a trained upsampler (JBU), both per-image fits, a rebuilt backbone
METHODS = "lowres,bilinear,jbu,implicit,dip,strided,large_image"


def _tiny_cfg():
    from featup.eval.methods import MethodConfig

    return MethodConfig(
        train_steps=1,
        batch_size=2,
        implicit_steps=1,
        dip_steps=1,
        n_jitters=1,
        strided_factor=2,
        large_factor=2,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from featup.eval.fixtures import make_ade20k, make_cocostuff, make_imagenet_folder

    root = tmp_path_factory.mktemp("data")
    return {
        "coco": make_cocostuff(root / "coco", n_train=4, n_val=2),
        "imagenet": make_imagenet_folder(root / "imagenet", n_classes=2, n_train=2, n_val=2),
        "ade": make_ade20k(root / "ade", n_train=2, n_val=1),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_run_probes_on_device(device, data, tmp_path):
    from featup.eval.probes import run_probes

    kw = dict(
        methods=METHODS,
        image_size=32,
        batch_size=2,
        probe_epochs=1,
        max_val_images=2,
        method_cfg=_tiny_cfg(),
        progress=False,
        log=lambda s: None,
    )
    with device_check(device) as chk:
        res = run_probes(SPEC, data["coco"], tmp_path / "o", device=device, **kw)
    assert chk.mixed == [], chk.report()
    assert set(res) == set(METHODS.split(",")) and all(r["n_images"] == 2 for r in res.values())
    if device == "meta":  # the stand-in computes on the CPU: the same results as a CPU run
        # (the learned upsamplers start from seeded weights, not from the global generator's state); to float
        # rounding: on a non-CPU device the JBU takes the per-phase kernel path instead of the CPU phases op
        torch.rand(5)  # whatever the global generator did before must not matter
        cpu = run_probes(SPEC, data["coco"], tmp_path / "cpu", device="cpu", **kw)
        assert cpu.keys() == res.keys()
        for method, scores in cpu.items():
            assert scores == pytest.approx(res[method], rel=1e-6, abs=1e-9), method


@pytest.mark.parametrize("device", DEVICES)
def test_run_cam_on_device(device, data, tmp_path):
    from featup.eval.cam import run_cam

    kw = dict(
        methods=METHODS,
        image_size=32,
        batch_size=2,
        classifier_epochs=2,
        max_images=2,
        method_cfg=_tiny_cfg(),
        progress=False,
        log=lambda s: None,
    )
    with device_check(device) as chk:
        res = run_cam(SPEC, data["imagenet"], tmp_path / "o", device=device, **kw)
    assert chk.mixed == [], chk.report()
    assert set(res) == set(METHODS.split(","))


@pytest.mark.parametrize("device", DEVICES)
def test_run_segmentation_on_device(device, data, tmp_path):
    from featup.eval.segmentation import run_segmentation

    kw = dict(
        upsamplers="jbu,carafe",
        variant="tiny",
        embed_dim=8,
        crop_size=32,
        steps=2,
        batch_size=2,
        flops_size=32,
        checkpoint_every=1,
        progress=False,
        log=lambda s: None,
    )
    with device_check(device) as chk:
        res = run_segmentation(data["ade"], tmp_path / "o", device=device, **kw)
    assert chk.mixed == [], chk.report()
    assert set(res) == {"bilinear", "jbu", "carafe"}
    # a resumed training (weights and AdamW moments loaded from the checkpoint) stays on the device too
    from featup.eval.datasets import ADE20K
    from featup.eval.segmentation import SegFormer, train_segmenter

    train = ADE20K(data["ade"], "training", 32, crop=True)
    model = SegFormer(train.n_classes, variant="tiny", embed_dim=8, upsampler="jbu")
    with device_check(device) as chk:
        model = train_segmenter(
            model,
            train,
            3,
            batch_size=2,
            checkpoint_path=tmp_path / "o" / "models" / "jbu",
            progress=False,
            device=device,
        )
    assert chk.mixed == [], chk.report()
    assert all(p.device.type == device for p in model.parameters())


def test_commands_default_to_cuda_when_available(monkeypatch):
    """One helper decides every command's default device: CUDA when available, else the CPU."""
    import argparse

    from featup.eval.cli import build_parser
    from featup.eval.devices import command_device, default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        command_device(argparse.Namespace(device="cuda"))
    with pytest.raises(ValueError, match="expected a torch device"):
        command_device(argparse.Namespace(device="gpu-please"))
    parser = build_parser()
    for argv in (
        ["probe", "d", "--backbone", "x"],
        ["cam", "d", "--backbone", "x"],
        ["segment", "d"],
        ["upsample", "i.png"],
        ["similarity", "i.png", "--point", "1,1"],
        ["fit-implicit", "i.png", "--backbone", "x", "--out", "o"],
        ["train-jbu", "--images", "d", "--backbone", "x"],
    ):
        args = parser.parse_args(argv)
        assert args.device is None, argv  # resolved by command_device when the command runs
        assert parser.parse_args([*argv, "--device", "cpu"]).device == "cpu"
