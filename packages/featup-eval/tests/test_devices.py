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
    from featup.eval.baselines import fit_dip

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
