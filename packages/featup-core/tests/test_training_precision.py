"""``precision=`` of train_jbu / fit_implicit: autocast forward passes, float32 loss and parameters, the float16
gradient scaler, and a precision that is recorded in the checkpoint and enforced on resume.

CPU autocast supports both bfloat16 and float16 for every op these loops use (the fused adaptive
convolution has its own autocast rule), so both paths run here end to end.
"""

from __future__ import annotations

import re

import pytest
import torch
from core_toys import Interrupt, PooledPointwise, assert_bitwise_equal, interrupt_at, params_of

import featup.core.training as training
from featup.core._train_state import check_precision, restore_grad_scaler
from featup.core.checkpoint import CheckpointError, load_checkpoint
from featup.core.implicit import ImplicitUpsampler
from featup.core.jbu import JBUStack
from featup.core.precision import TRAINING_PRECISIONS
from featup.core.training import JBU_MODEL_FILE, JBU_STATE_FILE, fit_implicit, train_jbu

torch.set_num_threads(1)

STRIDE = 4
JBU_FAST = dict(batch_size=4, kernel_size=STRIDE, progress=False, lr=5e-3)
IMP_FAST = dict(
    n_jitters=4,
    kernel_size=STRIDE,
    progress=False,
    lr=5e-3,
    upsampler_kwargs={"hidden_dim": 32, "n_freqs": 8},
)


def regions(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant RGB images in [0,1]: four regions cut by two random lines, one colour each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = torch.empty(n, 3, size, size)
    for i in range(n):
        angle, offset = torch.rand(2, 2, generator=g).unbind(1)
        sides = [
            (torch.cos(a * 6.3) * xx + torch.sin(a * 6.3) * yy > o - 0.5).long()
            for a, o in zip(angle, offset)
        ]
        imgs[i] = torch.rand(4, 3, generator=g)[2 * sides[0] + sides[1]].permute(2, 0, 1)
    return imgs


LOW = ["bfloat16", "float16"]


class DtypeSpy:
    """Records, per call, whether autocast was on and the dtypes seen by the backbone, the upsampler and the
    loss; wraps ``training.reconstruction_loss`` through ``monkeypatch``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backbone_autocast: list[bool] = []
        self.upsampler_out: list[torch.dtype] = []
        self.loss_inputs: list[tuple[torch.dtype, ...]] = []
        self.loss_autocast: list[bool] = []
        real = training.reconstruction_loss

        def loss(pred, target, log_scale=None):
            self.loss_inputs.append((pred.dtype, target.dtype, log_scale.dtype))
            self.loss_autocast.append(torch.is_autocast_enabled("cpu"))
            out = real(pred, target, log_scale)
            assert out.dtype == torch.float32
            return out

        monkeypatch.setattr(training, "reconstruction_loss", loss)

    def backbone(self, module: torch.nn.Module) -> None:
        module.register_forward_hook(
            lambda *_: self.backbone_autocast.append(torch.is_autocast_enabled("cpu"))
        )

    def upsampler(self, module: torch.nn.Module) -> None:
        module.register_forward_hook(lambda m, i, out: self.upsampler_out.append(out.dtype))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("precision", LOW)
def test_train_jbu_low_precision_learns_with_float32_state(precision, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    backbone = PooledPointwise()
    spy.backbone(backbone)
    up = JBUStack()
    spy.upsampler(up)
    losses: list[float] = []
    out = train_jbu(
        backbone,
        regions(8, 24, seed=1),
        steps=24,
        upsampler=up,
        precision=precision,
        callback=lambda s, logs: losses.append(logs["loss"]),
        **{**JBU_FAST, "lr": 3e-3},
    )
    print(f"train_jbu {precision}: loss {_mean(losses[:5]):.4f} -> {_mean(losses[-5:]):.4f}")
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.05
    assert out is up and not up.training
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert all(v.dtype == torch.float32 for v in up.state_dict().values() if v.is_floating_point())
    # the forward passes ran under autocast in the requested dtype ...
    assert spy.backbone_autocast and all(spy.backbone_autocast[1:])  # [0] is the shape probe
    assert set(spy.upsampler_out) == {getattr(torch, precision)}
    # ... and the loss in float32 with autocast off
    assert spy.loss_inputs and all(d == (torch.float32,) * 3 for d in spy.loss_inputs)
    assert not any(spy.loss_autocast)


def test_train_jbu_float32_is_untouched_by_autocast(monkeypatch):
    spy = DtypeSpy(monkeypatch)
    backbone = PooledPointwise()
    spy.backbone(backbone)
    runs = []
    for kwargs in ({}, {"precision": "float32"}):  # the default, then the explicit value
        torch.manual_seed(0)
        up = JBUStack()
        spy.upsampler(up)
        runs.append(
            params_of(train_jbu(backbone, regions(4, 24), steps=2, upsampler=up, **kwargs, **JBU_FAST))
        )
    assert not any(spy.backbone_autocast) and set(spy.upsampler_out) == {torch.float32}
    assert spy.loss_inputs and all(d == (torch.float32,) * 3 for d in spy.loss_inputs)
    assert_bitwise_equal(*runs)


@pytest.mark.parametrize("precision", LOW)
def test_fit_implicit_low_precision_learns_with_float32_state(precision, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    backbone = PooledPointwise()
    spy.backbone(backbone)
    losses: list[float] = []
    imp = fit_implicit(
        backbone,
        regions(1, 24, seed=3),
        steps=20,
        precision=precision,
        callback=lambda s, logs: losses.append(logs["rec_loss"]),
        residual=False,  # the paper's start from noise: its loss has far to fall, a clear sign of learning
        **IMP_FAST,
    )
    print(f"fit_implicit {precision}: loss {_mean(losses[:5]):.4f} -> {_mean(losses[-5:]):.4f}")
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.05
    assert isinstance(imp, ImplicitUpsampler) and not imp.training
    assert all(p.dtype == torch.float32 for p in imp.parameters())
    assert spy.backbone_autocast and all(spy.backbone_autocast)
    assert spy.loss_inputs and all(d == (torch.float32,) * 3 for d in spy.loss_inputs)
    assert not any(spy.loss_autocast)
    with torch.no_grad():
        assert imp.render((24, 24)).dtype == torch.float32


def _growing_scaler(monkeypatch: pytest.MonkeyPatch) -> list[torch.amp.GradScaler]:
    """Make the float16 loss scale change every step (growth_interval=1), so a resume that dropped the
    scaler's state would diverge; returns the scalers the runs create. On the toy problem the scale then
    alternates: 2**17 overflows the float16 gradients, that step is skipped and the scale backs off to 2**16.
    """
    made: list[torch.amp.GradScaler] = []

    def make(precision, device):
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "float16", growth_interval=1)
        made.append(scaler)
        return scaler

    monkeypatch.setattr(training, "make_grad_scaler", make)
    return made


def test_float16_uses_the_grad_scaler_and_resumes_exactly(tmp_path, monkeypatch):
    made = _growing_scaler(monkeypatch)
    backbone = PooledPointwise()
    images = regions(5, 24, seed=6)
    # checkpoints at steps 3 and 5, where the scale is 2**17; the interrupted run resumes from step 3
    run = dict(steps=5, checkpoint_every=3, precision="float16", **JBU_FAST)
    full = train_jbu(backbone, images, checkpoint_dir=tmp_path / "full", **run)
    assert made[-1].is_enabled()
    _, full_cfg = load_checkpoint(tmp_path / "full" / JBU_STATE_FILE)
    assert full_cfg["precision"] == "float16"
    # the scale moved away from its initial 2**16 and is part of the checkpoint
    assert full_cfg["grad_scaler"]["scale"] == made[-1].get_scale() != 2.0**16
    with pytest.raises(Interrupt):
        train_jbu(backbone, images, checkpoint_dir=tmp_path / "cut", callback=interrupt_at(4), **run)
    assert load_checkpoint(tmp_path / "cut" / JBU_STATE_FILE)[1]["grad_scaler"]["scale"] != 2.0**16
    resumed = train_jbu(backbone, images, checkpoint_dir=tmp_path / "cut", **run)
    assert made[-1].get_scale() == full_cfg["grad_scaler"]["scale"]
    assert_bitwise_equal(params_of(full), params_of(resumed))
    cut_state, cut_cfg = load_checkpoint(tmp_path / "cut" / JBU_STATE_FILE)
    assert_bitwise_equal(load_checkpoint(tmp_path / "full" / JBU_STATE_FILE)[0], cut_state)
    assert cut_cfg["grad_scaler"] == full_cfg["grad_scaler"]
    # bfloat16 and float32 need no scaling: the scaler is disabled and nothing is stored for it
    train_jbu(backbone, images, steps=1, checkpoint_dir=tmp_path / "bf", precision="bfloat16", **JBU_FAST)
    assert not made[-1].is_enabled()
    _, bf_cfg = load_checkpoint(tmp_path / "bf" / JBU_STATE_FILE)
    assert bf_cfg["precision"] == "bfloat16" and bf_cfg["grad_scaler"] == {}


def test_fit_implicit_float16_resumes_exactly(tmp_path, monkeypatch):
    _growing_scaler(monkeypatch)
    backbone = PooledPointwise()
    image = regions(1, 24, seed=7)
    run = dict(steps=5, checkpoint_every=3, precision="float16", **IMP_FAST)
    full = fit_implicit(backbone, image, checkpoint_path=tmp_path / "full", **run)
    with pytest.raises(Interrupt):
        fit_implicit(backbone, image, checkpoint_path=tmp_path / "cut", callback=interrupt_at(4), **run)
    assert load_checkpoint(tmp_path / "cut.safetensors")[1]["grad_scaler"]["scale"] != 2.0**16
    resumed = fit_implicit(backbone, image, checkpoint_path=tmp_path / "cut", **run)
    assert_bitwise_equal(params_of(full), params_of(resumed))
    _, cfg = load_checkpoint(tmp_path / "cut.safetensors")
    assert cfg["precision"] == "float16" and cfg["grad_scaler"]["scale"] != 2.0**16


def test_precision_is_recorded_and_resume_in_another_is_refused(tmp_path):
    backbone = PooledPointwise()
    images = regions(4, 24, seed=9)
    train_jbu(backbone, images, steps=2, checkpoint_dir=tmp_path, precision="bfloat16", **JBU_FAST)
    assert load_checkpoint(tmp_path / JBU_STATE_FILE)[1]["precision"] == "bfloat16"
    assert load_checkpoint(tmp_path / JBU_MODEL_FILE)[1]["extra"]["precision"] == "bfloat16"
    before = load_checkpoint(tmp_path / JBU_STATE_FILE)[0]
    for other in ("float32", "float16"):
        with pytest.raises(CheckpointError, match="precision='bfloat16'.*precision='bfloat16' to continue"):
            train_jbu(backbone, images, steps=4, checkpoint_dir=tmp_path, precision=other, **JBU_FAST)
    assert_bitwise_equal(before, load_checkpoint(tmp_path / JBU_STATE_FILE)[0])  # refusing wrote nothing
    steps: list[int] = []
    train_jbu(
        backbone,
        images,
        steps=3,
        checkpoint_dir=tmp_path,
        precision="bfloat16",
        callback=lambda s, logs: steps.append(s),
        **JBU_FAST,
    )
    assert steps == [3]  # the same precision continues the run
    # fit_implicit records and enforces it the same way
    image = regions(1, 24, seed=2)
    fit_implicit(backbone, image, steps=1, checkpoint_path=tmp_path / "imp", precision="float16", **IMP_FAST)
    assert load_checkpoint(tmp_path / "imp.safetensors")[1]["precision"] == "float16"
    with pytest.raises(CheckpointError, match="precision='float16'"):
        fit_implicit(backbone, image, steps=2, checkpoint_path=tmp_path / "imp", **IMP_FAST)
    # resume=False starts over in the new precision
    fit_implicit(backbone, image, steps=1, checkpoint_path=tmp_path / "imp", resume=False, **IMP_FAST)
    assert load_checkpoint(tmp_path / "imp.safetensors")[1]["precision"] == "float32"


def test_checkpoints_from_before_the_option_count_as_float32(tmp_path):
    check_precision({}, "float32", tmp_path)
    with pytest.raises(CheckpointError, match="precision='float32'"):
        check_precision({}, "bfloat16", tmp_path)
    scaler = torch.amp.GradScaler("cpu")
    restore_grad_scaler(scaler, {"grad_scaler": {**scaler.state_dict(), "scale": 1024.0}}, tmp_path)
    assert scaler.get_scale() == 1024.0
    with pytest.raises(CheckpointError, match="no gradient-scaler state"):
        restore_grad_scaler(torch.amp.GradScaler("cpu"), {"grad_scaler": {}}, tmp_path)
    restore_grad_scaler(torch.amp.GradScaler("cpu", enabled=False), {}, tmp_path)  # nothing to restore


@pytest.mark.parametrize("bad", ["bf16", "fp16", "float64", "", torch.bfloat16, None])
def test_bad_precision_is_a_value_error_listing_the_accepted_values(bad):
    backbone = PooledPointwise()
    accepted = ", ".join(repr(p) for p in TRAINING_PRECISIONS)
    assert accepted == "'float32', 'bfloat16', 'float16'"
    with pytest.raises(ValueError, match=re.escape(f"expected precision one of {accepted}, got {bad!r}")):
        train_jbu(backbone, regions(2, 24), steps=1, precision=bad, **JBU_FAST)
    with pytest.raises(ValueError, match="expected precision one of 'float32', 'bfloat16', 'float16'"):
        fit_implicit(backbone, regions(1, 24), steps=1, precision=bad, **IMP_FAST)
