"""train_jbu's projected-first path, batched backbone call, non-finite guards and RNG hygiene.

The projected-first path is checked against the plain path on the same seed: with the downsampler's
salience dropout off (the one place where the two differ by construction) the loss curves and the trained
parameters agree to float32 rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from core_toys import PooledPointwise, params_of

import featup.core.training as training
from featup.core.checkpoint import load_checkpoint
from featup.core.downsamplers import AttentionDownsampler, SimpleDownsampler
from featup.core.jbu import JBUStack
from featup.core.jitter import apply_jitter, sample_jitter
from featup.core.losses import UncertaintyHead
from featup.core.training import JBU_STATE_FILE, _JBUObjective, channel_linear, train_jbu

torch.set_num_threads(1)

STRIDE = 4
JBU_FAST = dict(batch_size=4, kernel_size=STRIDE, progress=False, lr=5e-3)


def regions(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant RGB images in [0,1]: four regions cut by two random lines."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = torch.empty(n, 3, size, size)
    for i in range(n):
        code = torch.zeros(size, size, dtype=torch.long)
        for _ in range(2):
            angle = torch.rand((), generator=g) * 2 * torch.pi
            side = (torch.cos(angle) * xx + torch.sin(angle) * yy) > float(torch.rand((), generator=g)) - 0.5
            code = code * 2 + side.long()
        imgs[i] = torch.rand(4, 3, generator=g)[code].permute(2, 0, 1)
    return imgs


def _no_salience_dropout(monkeypatch):
    real = training.create_downsampler

    def build(kind, dim, kernel_size, *, blur=False):
        down = real(kind, dim, kernel_size, blur=blur)
        if isinstance(down, AttentionDownsampler):
            down.dropout = 0.0
            down.salience_net[0].p = 0.0
        return down

    monkeypatch.setattr(training, "create_downsampler", build)


def _curve(backbone, images, **kwargs):
    losses: list[float] = []
    up = train_jbu(backbone, images, callback=lambda s, logs: losses.append(logs["loss"]), **kwargs)
    return losses, params_of(up)


@pytest.mark.parametrize(
    "downsampler, blur, proj_dim",
    [("attention", False, 5), ("attention", True, 5), ("simple", False, 5)],
)
def test_project_first_matches_the_plain_path(monkeypatch, downsampler, blur, proj_dim):
    _no_salience_dropout(monkeypatch)
    backbone = PooledPointwise(dim=12)
    images = regions(6, 24, seed=5)
    kwargs = dict(steps=6, seed=3, downsampler=downsampler, blur=blur, proj_dim=proj_dim, **JBU_FAST)
    fast_losses, _ = _curve(backbone, images, project_first=True, **kwargs)
    plain_losses, _ = _curve(backbone, images, project_first=False, **kwargs)
    assert fast_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("downsampler", ["attention", "simple"])
@pytest.mark.parametrize("blur", [False, True])
def test_project_first_gives_the_plain_loss_and_gradients(downsampler, blur):
    """One objective evaluation, both paths on the same modules and dropout masks: loss and every
    parameter's gradient agree to float32 rounding (NAdam amplifies rounding in near-zero gradients, so
    trained parameters are compared through the loss curve above instead)."""
    torch.manual_seed(0)
    up = JBUStack()
    if downsampler == "attention":
        down = AttentionDownsampler(12, 4, dropout=0.0, blur=blur)
    else:
        down = SimpleDownsampler(4)
    head = UncertaintyHead(12)
    with torch.no_grad():
        head.conv.weight.normal_(0, 0.1)
    image = regions(2, 24, seed=9)
    lr_feats = PooledPointwise(dim=12)(image)
    gen = torch.Generator().manual_seed(1)
    jitters = [[sample_jitter(gen) for _ in range(2)] for _ in range(3)]
    targets = [PooledPointwise(dim=12)(apply_jitter(image, p)) for p in jitters]
    proj = torch.randn(12, 5, generator=gen) / 5**0.5
    results = []
    for fast in (False, True):
        objective = _JBUObjective(up, down, head, project_first=fast).train()
        assert objective.project_first is fast
        objective.zero_grad()
        torch.manual_seed(5)  # the same Dropout2d masks in the stack's range MLPs
        loss = objective(image, lr_feats, jitters, targets, proj)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-5, atol=1e-7)
    assert grads_fast.keys() == grads_plain.keys()
    for n in grads_plain:
        torch.testing.assert_close(grads_fast[n], grads_plain[n], rtol=1e-3, atol=1e-6, msg=n)


def test_project_first_upsamples_projected_channels_only(monkeypatch):
    seen: list[int] = []
    real = JBUStack.upsample

    def spy(self, lr_feats, image, size):
        seen.append(int(lr_feats.shape[1]))
        return real(self, lr_feats, image, size)

    monkeypatch.setattr(JBUStack, "upsample", spy)
    backbone = PooledPointwise(dim=12)
    train_jbu(backbone, regions(4, 24, seed=1), steps=2, proj_dim=5, **JBU_FAST)
    assert seen == [6, 6]  # 5 projected channels + the salience channel, once per step
    seen.clear()
    train_jbu(backbone, regions(4, 24, seed=1), steps=2, proj_dim=5, project_first=False, **JBU_FAST)
    assert seen == [12, 12]
    seen.clear()
    # no projection, or one as wide as the features: nothing to gain, the plain path runs
    train_jbu(backbone, regions(4, 24, seed=1), steps=1, proj_dim=None, **JBU_FAST)
    train_jbu(backbone, regions(4, 24, seed=1), steps=1, proj_dim=11, **JBU_FAST)
    assert seen == [12, 12]
    seen.clear()
    # a per-feature stack is not channel-linear: it must see the backbone's channels
    train_jbu(backbone, regions(4, 24, seed=1), steps=2, upsampler=JBUStack(12), proj_dim=5, **JBU_FAST)
    assert seen == [12, 12]


def test_channel_linear():
    assert channel_linear(JBUStack())
    assert not channel_linear(JBUStack(8))
    assert not channel_linear(JBUStack(8, original=True))
    assert not channel_linear(torch.nn.Conv2d(3, 3, 1))


def test_projected_salience_equals_salience_of_upsampled_features():
    """The identity the fast path rests on: conv(up(f)) = up(conv_nobias(f)) + bias for a channel-linear
    stack in eval mode, and the pooling commutes with the projection."""
    torch.manual_seed(0)
    up = JBUStack().eval()
    down = AttentionDownsampler(12, 4).eval()
    f, image = torch.randn(2, 12, 6, 6), torch.rand(2, 3, 24, 24)
    proj = torch.randn(12, 5)
    with torch.no_grad():
        hr = up(f, image)
        plain = torch.einsum("bchw,cd->bdhw", down(hr, (6, 6)), proj)
        conv = down.salience_net[1]
        low = torch.cat(
            [torch.einsum("bchw,cd->bdhw", f, proj), torch.nn.functional.conv2d(f, conv.weight)], 1
        )
        hr_low = up(low, image)
        kernels = down.salience_kernels(hr_low[:, 5:] + conv.bias.view(1, 1, 1, 1), (6, 6))
        fast = training.window_pool(hr_low[:, :5], kernels, (6, 6))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_backbone_sees_all_views_of_a_step_in_one_call():
    calls: list[int] = []
    backbone = PooledPointwise()

    def counting(x):
        calls.append(int(x.shape[0]))
        return backbone(x)

    train_jbu(counting, regions(4, 24, seed=2), steps=3, n_jitters=2, **JBU_FAST)
    assert calls == [1] + [4, 8] * 3  # the probe for the width, then per step the batch and all its views


def test_non_finite_features_raise_naming_the_step_before_writing(tmp_path):
    backbone = PooledPointwise()
    calls = [0]

    def poisoned(x):
        calls[0] += 1
        out = backbone(x)
        if calls[0] >= 4:  # probe, step 1's batch and views, then step 2 goes bad
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(ValueError, match="finite backbone features.*step 1"):
        train_jbu(
            poisoned, regions(4, 24, seed=2), steps=5, checkpoint_dir=tmp_path, checkpoint_every=1, **JBU_FAST
        )
    assert load_checkpoint(tmp_path / JBU_STATE_FILE)[1]["step"] == 1


def test_non_finite_loss_raises_before_the_update_and_the_checkpoint(tmp_path, monkeypatch):
    real = training.reconstruction_loss
    calls = [0]

    def exploding(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("inf") if calls[0] == 2 else loss

    monkeypatch.setattr(training, "reconstruction_loss", exploding)
    backbone = PooledPointwise()
    images = regions(4, 24, seed=2)
    with pytest.raises(FloatingPointError, match="step 2"):  # one jitter: one loss call per step
        train_jbu(
            backbone, images, steps=5, n_jitters=1, checkpoint_dir=tmp_path, checkpoint_every=1, **JBU_FAST
        )
    tensors, config = load_checkpoint(tmp_path / JBU_STATE_FILE)
    assert config["step"] == 1
    monkeypatch.setattr(training, "reconstruction_loss", real)
    one = params_of(train_jbu(backbone, images, steps=1, n_jitters=1, **JBU_FAST))
    for k, v in one.items():
        assert torch.equal(tensors[f"upsampler.{k}"], v), k


def test_cpu_training_never_seeds_cuda_generators(monkeypatch):
    """torch.manual_seed seeds (or queues seeding of) every CUDA device, which fork_rng does not restore."""
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: seeded.append(s))
    backbone = PooledPointwise()
    images = regions(4, 24, seed=2)
    train_jbu(backbone, images, steps=2, **JBU_FAST)
    train_jbu(backbone, list(images.split(2)), steps=2, **JBU_FAST)  # an iterable source reseeds per pass
    assert seeded == []


def test_training_context_forks_every_initialised_cuda_device(monkeypatch):
    forked: list[list[int]] = []

    @contextlib.contextmanager
    def recording_fork_rng(devices=None, enabled=True):
        forked.append(list(devices))
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", recording_fork_rng)
    with training._training_context(torch.device("cpu")):
        pass
    with training._training_context(torch.device("cuda", 1)):
        pass
    assert forked == [[0, 1], [0, 1]]


def test_blur_is_a_run_hyperparameter(tmp_path):
    backbone = PooledPointwise()
    images = regions(4, 24, seed=2)
    train_jbu(backbone, images, steps=1, blur=False, checkpoint_dir=tmp_path, **JBU_FAST)
    assert load_checkpoint(tmp_path / JBU_STATE_FILE)[1]["hparams"]["blur"] is False
    with pytest.raises(Exception, match="blur"):
        train_jbu(backbone, images, steps=2, checkpoint_dir=tmp_path, **JBU_FAST)
    with pytest.raises(TypeError, match="blur"):
        train_jbu(backbone, images, steps=1, blur=1, **JBU_FAST)
    assert isinstance(training.create_downsampler("simple", 3, 4, blur=True), SimpleDownsampler)


def test_safe_start_gates_train_at_gate_lr_scale_times_the_rate():
    # one step from the safe start: NAdam's first step has the same size for every parameter whatever its
    # gradient, so the gates move gate_lr_scale times as far as with scale 1, and nothing else changes
    backbone, images = PooledPointwise(), regions(4, 24, seed=3)
    kw = dict(JBU_FAST, steps=1, schedule="constant")
    slow = train_jbu(backbone, images, gate_lr_scale=1.0, **kw)
    fast = train_jbu(backbone, images, gate_lr_scale=10.0, **kw)
    used = [(s, f) for s, f in zip(slow.stages, fast.stages) if s.gate.abs() > 0]
    assert len(used) == 2  # 6 -> 12 -> 24 px: two stages train
    for s, f in used:
        torch.testing.assert_close(f.gate, 10 * s.gate, rtol=1e-3, atol=0)
        torch.testing.assert_close(f.sigma_spatial, s.sigma_spatial)
    with pytest.raises(ValueError, match="gate_lr_scale"):
        train_jbu(backbone, images, gate_lr_scale=0.0, **kw)
