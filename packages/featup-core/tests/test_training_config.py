"""JBUTrainConfig: validated once, presets, the learning-rate schedule, stored in and checked on resume."""

from __future__ import annotations

import math

import pytest
import torch

from featup.core.checkpoint import CheckpointError, load_checkpoint
from featup.core.training import JBU_STATE_FILE, train_jbu
from featup.core.training_config import JBU_PRESETS, JBUTrainConfig, learning_rate_factor

torch.set_num_threads(1)


class Pooled(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.cat([x, x.square()], 1), 4)


FAST = dict(batch_size=2, kernel_size=4, progress=False)


def test_paper_preset_is_table_7():
    paper = JBUTrainConfig.preset("paper")
    assert paper == JBUTrainConfig()
    assert (paper.steps, paper.lr, paper.schedule, paper.batch_size, paper.n_jitters) == (
        2000,
        1e-3,
        "constant",
        4,
        2,
    )
    assert (paper.max_zoom, paper.p_flip, paper.proj_dim, paper.kernel_size) == (2.0, 0.5, 30, 16)
    assert set(JBU_PRESETS) == {"paper", "default"}


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"lr": 0.0}, ValueError, "lr > 0"),
        ({"lr": float("nan")}, TypeError, "lr"),
        ({"schedule": "step"}, ValueError, "schedule"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"p_flip": 1.5}, ValueError, r"p_flip in \[0, 1\]"),
        ({"proj_dim": 0}, ValueError, "proj_dim"),
        ({"precision": "int8"}, ValueError, "precision"),
        ({"blur": 1}, TypeError, "blur"),
        ({"steps": 2.0}, TypeError, "steps"),
    ],
)
def test_config_is_validated_on_creation(changes, error, match):
    with pytest.raises(error, match=match):
        JBUTrainConfig(**changes)
    with pytest.raises(error, match=match):
        JBUTrainConfig().replace(**changes)


def test_unknown_settings_and_presets_are_clear_errors():
    with pytest.raises(TypeError, match="unexpected train_jbu setting.*'learning_rate'"):
        JBUTrainConfig.preset("default", learning_rate=1e-3)
    with pytest.raises(ValueError, match="preset"):
        JBUTrainConfig.preset("fast")
    with pytest.raises(TypeError, match="learning_rate"):
        train_jbu(Pooled(), torch.rand(2, 3, 16, 16), steps=1, learning_rate=1e-3, **FAST)


def test_learning_rate_schedule():
    assert learning_rate_factor("constant", 7, 10, 3) == 1.0
    factors = [learning_rate_factor("cosine", s, 10, 3) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == 1.0 and all(a > b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert JBUTrainConfig(lr=0.1, schedule="cosine", steps=10, warmup_steps=0).lr_at(0) == pytest.approx(0.1)


def test_train_jbu_steps_the_optimizer_at_the_scheduled_rates(monkeypatch):
    rates: list[float] = []
    real_step = torch.optim.NAdam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.NAdam, "step", recording_step)
    train_jbu(Pooled(), torch.rand(4, 3, 16, 16), steps=6, lr=0.01, schedule="cosine", warmup_steps=2, **FAST)
    cfg = JBUTrainConfig(steps=6, lr=0.01, schedule="cosine", warmup_steps=2)
    assert rates == pytest.approx([cfg.lr_at(s) for s in range(6)])
    rates.clear()
    train_jbu(Pooled(), torch.rand(4, 3, 16, 16), steps=3, preset="paper", lr=0.01, **FAST)
    assert rates == [0.01] * 3


def test_config_is_stored_and_a_resume_with_another_schedule_is_refused(tmp_path):
    images = torch.rand(4, 3, 16, 16)
    train_jbu(Pooled(), images, steps=2, schedule="cosine", warmup_steps=1, checkpoint_dir=tmp_path, **FAST)
    stored = load_checkpoint(tmp_path / JBU_STATE_FILE)[1]
    assert stored["config"]["schedule"] == "cosine" and stored["hparams"]["schedule_steps"] == 2
    assert JBUTrainConfig(**stored["config"]).schedule == "cosine"
    with pytest.raises(CheckpointError, match="schedule"):
        train_jbu(Pooled(), images, steps=3, preset="paper", checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match="schedule_steps"):  # the cosine horizon is part of the run
        train_jbu(
            Pooled(), images, steps=3, schedule="cosine", warmup_steps=1, checkpoint_dir=tmp_path, **FAST
        )


def test_a_config_object_and_keywords():
    cfg = JBUTrainConfig(steps=2, lr=0.02, batch_size=2, kernel_size=4)
    up = train_jbu(Pooled(), torch.rand(2, 3, 16, 16), config=cfg, progress=False, n_jitters=1)
    assert not up.training
    with pytest.raises(TypeError, match="JBUTrainConfig"):
        train_jbu(Pooled(), torch.rand(2, 3, 16, 16), config={"lr": 1.0})
