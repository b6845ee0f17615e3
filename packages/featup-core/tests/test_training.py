"""train_jbu / fit_implicit: they learn on a problem with known high-res features, are reproducible,
resume exactly, and reject bad input with clear errors.

The synthetic problem: images are piecewise-constant (regions cut by random lines), the "true"
high-resolution features are a fixed pointwise nonlinearity of the pixel colours, ``phi(x) = tanh(A x + b)``,
and the frozen backbone is their strided average pool. So the ideal upsampled features are known exactly and
an edge-aware upsampler must beat bilinear interpolation of the pooled features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_toys import Interrupt, PooledPointwise, assert_bitwise_equal, interrupt_at, params_of
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from featup.core import _distributed as dist_utils
from featup.core._train_data import IndexedSource, IterableSource, make_source
from featup.core.checkpoint import CheckpointError, load_checkpoint
from featup.core.implicit import ImplicitUpsampler
from featup.core.jbu import JBUStack
from featup.core.training import JBU_MODEL_FILE, JBU_STATE_FILE, fit_implicit, train_jbu

torch.set_num_threads(1)

STRIDE = 4


def regions(n: int, size: int | tuple[int, int] = 32, seed: int = 0, n_lines: int = 2) -> torch.Tensor:
    """Piecewise-constant RGB images in [0,1]: regions cut by random straight lines, one colour each."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    imgs = torch.empty(n, 3, h, w)
    for i in range(n):
        code = torch.zeros(h, w, dtype=torch.long)
        for _ in range(n_lines):
            angle = float(torch.rand(1, generator=g)) * 2 * torch.pi
            offset = float(torch.rand(1, generator=g)) - 0.5
            side = (torch.cos(torch.tensor(angle)) * xx + torch.sin(torch.tensor(angle)) * yy) > offset
            code = code * 2 + side.long()
        colours = torch.rand(2**n_lines, 3, generator=g)
        imgs[i] = colours[code].permute(2, 0, 1)
    return imgs


def upsample_error(up: nn.Module | None, backbone: PooledPointwise, images: torch.Tensor) -> float:
    """Mean squared error to the known high-res features (bilinear when ``up`` is None)."""
    with torch.no_grad():
        lr = backbone(images)
        truth = backbone.hr_features(images)
        if up is None:
            pred = F.interpolate(lr, size=images.shape[-2:], mode="bilinear", align_corners=False)
        else:
            pred = up(lr, images)
        return float((pred - truth).square().mean())


JBU_FAST = dict(batch_size=4, kernel_size=STRIDE, progress=False, lr=5e-3)
IMP_FAST = dict(
    n_jitters=4,
    kernel_size=STRIDE,
    progress=False,
    lr=5e-3,
    upsampler_kwargs={"hidden_dim": 32, "n_freqs": 8},
)


# ----------------------------------------------------------------------------------------------------------
# learning on the synthetic problem


def test_train_jbu_lowers_loss_and_beats_bilinear():
    backbone = PooledPointwise()
    train, held_out = regions(16, 32, seed=1), regions(8, 32, seed=2)
    losses: list[float] = []
    # lr 3e-3: on this toy, much larger rates drive the spatial kernels to a delta (plain 2x bilinear stages)
    up = train_jbu(
        backbone,
        train,
        steps=100,
        callback=lambda s, logs: losses.append(logs["loss"]),
        **{**JBU_FAST, "lr": 3e-3},
    )
    assert isinstance(up, JBUStack) and not up.training
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    err_jbu, err_bilinear = upsample_error(up, backbone, held_out), upsample_error(None, backbone, held_out)
    print(
        f"train_jbu loss {first:.4f} -> {last:.4f}; held-out MSE {err_jbu:.5f} vs bilinear {err_bilinear:.5f}"
    )
    assert last < first
    assert err_jbu < 0.9 * err_bilinear


def test_fit_implicit_lowers_loss_and_beats_bilinear():
    backbone = PooledPointwise()
    image = regions(1, 32, seed=3)
    losses: list[float] = []
    imp = fit_implicit(
        backbone, image, steps=40, callback=lambda s, logs: losses.append(logs["rec_loss"]), **IMP_FAST
    )
    assert isinstance(imp, ImplicitUpsampler) and not imp.training
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    with torch.no_grad():
        rendered = imp.render((32, 32))
    assert rendered.shape == (1, 8, 32, 32)
    truth = backbone.hr_features(image)
    err_imp = float((rendered - truth).square().mean())
    err_bilinear = upsample_error(None, backbone, image)
    print(f"fit_implicit loss {first:.4f} -> {last:.4f}; MSE {err_imp:.5f} vs bilinear {err_bilinear:.5f}")
    assert last < first
    assert err_imp < 0.9 * err_bilinear


# ----------------------------------------------------------------------------------------------------------
# reproducibility and resume


def test_train_jbu_is_bitwise_reproducible_and_leaves_global_rng_alone():
    backbone = PooledPointwise()
    images = regions(6, 24, seed=4)
    before = torch.get_rng_state()
    a = params_of(train_jbu(backbone, images, steps=4, seed=7, **JBU_FAST))
    assert torch.equal(torch.get_rng_state(), before)
    b = params_of(train_jbu(backbone, images, steps=4, seed=7, **JBU_FAST))
    c = params_of(train_jbu(backbone, images, steps=4, seed=8, **JBU_FAST))
    assert_bitwise_equal(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_fit_implicit_is_bitwise_reproducible():
    backbone = PooledPointwise()
    image = regions(1, 24, seed=5)
    a = params_of(fit_implicit(backbone, image, steps=3, seed=1, **IMP_FAST))
    b = params_of(fit_implicit(backbone, image, steps=3, seed=1, **IMP_FAST))
    c = params_of(fit_implicit(backbone, image, steps=3, seed=2, **IMP_FAST))
    assert_bitwise_equal(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_jbu_resume_after_interruption_is_exact(tmp_path):
    backbone = PooledPointwise()
    images = regions(5, 24, seed=6)  # 5 images, batch 4: batches straddle epochs
    full = train_jbu(
        backbone, images, steps=8, checkpoint_dir=tmp_path / "full", checkpoint_every=3, **JBU_FAST
    )
    with pytest.raises(Interrupt):
        train_jbu(
            backbone,
            images,
            steps=8,
            checkpoint_dir=tmp_path / "cut",
            checkpoint_every=3,
            callback=interrupt_at(7),
            **JBU_FAST,
        )
    _, cfg = load_checkpoint(tmp_path / "cut" / JBU_STATE_FILE)
    assert cfg["step"] == 6  # the last checkpoint before the interruption
    resumed_steps: list[int] = []
    resumed = train_jbu(
        backbone,
        images,
        steps=8,
        checkpoint_dir=tmp_path / "cut",
        checkpoint_every=3,
        callback=lambda s, logs: resumed_steps.append(s),
        **JBU_FAST,
    )
    assert resumed_steps == [7, 8]
    assert_bitwise_equal(params_of(full), params_of(resumed))
    # the full state (downsampler, uncertainty head, optimizer moments) agrees too
    full_state, full_cfg = load_checkpoint(tmp_path / "full" / JBU_STATE_FILE)
    cut_state, cut_cfg = load_checkpoint(tmp_path / "cut" / JBU_STATE_FILE)
    assert_bitwise_equal(full_state, cut_state)
    assert full_cfg["step"] == cut_cfg["step"] == 8
    assert any(k.startswith("downsampler.") for k in full_state)
    assert any(k.startswith("head.") for k in full_state)
    assert any(k.startswith("optimizer.") for k in full_state)
    # the finished stack is saved as a plain JBUStack checkpoint
    loaded = JBUStack.load(tmp_path / "full" / JBU_MODEL_FILE)
    assert_bitwise_equal(params_of(loaded), params_of(full))
    # a finished run resumes to a no-op
    again = train_jbu(backbone, images, steps=8, checkpoint_dir=tmp_path / "full", **JBU_FAST)
    assert_bitwise_equal(params_of(again), params_of(full))


def test_fit_implicit_resume_after_interruption_is_exact(tmp_path):
    backbone = PooledPointwise()
    image = regions(1, 24, seed=7)
    full = fit_implicit(
        backbone, image, steps=6, checkpoint_path=tmp_path / "full", checkpoint_every=2, **IMP_FAST
    )
    with pytest.raises(Interrupt):
        fit_implicit(
            backbone,
            image,
            steps=6,
            checkpoint_path=tmp_path / "cut",
            checkpoint_every=2,
            callback=interrupt_at(5),
            **IMP_FAST,
        )
    resumed = fit_implicit(
        backbone, image, steps=6, checkpoint_path=tmp_path / "cut", checkpoint_every=2, **IMP_FAST
    )
    assert_bitwise_equal(params_of(full), params_of(resumed))
    # a checkpoint of another image is refused
    with pytest.raises(CheckpointError, match="different image"):
        fit_implicit(backbone, regions(1, 24, seed=8), steps=7, checkpoint_path=tmp_path / "cut", **IMP_FAST)


def test_resume_with_other_hyperparameters_is_refused(tmp_path):
    backbone = PooledPointwise()
    images = regions(4, 24, seed=9)
    train_jbu(backbone, images, steps=2, checkpoint_dir=tmp_path, **JBU_FAST)
    with pytest.raises(CheckpointError, match="n_jitters"):
        train_jbu(backbone, images, steps=4, checkpoint_dir=tmp_path, **{**JBU_FAST, "n_jitters": 3})
    # resume=False starts over instead
    train_jbu(
        backbone, images, steps=1, checkpoint_dir=tmp_path, resume=False, **{**JBU_FAST, "n_jitters": 3}
    )
    # the jitter probabilities are run hyperparameters too
    with pytest.raises(CheckpointError, match="p_flip"):
        train_jbu(
            backbone, images, steps=4, checkpoint_dir=tmp_path, p_flip=0.0, **{**JBU_FAST, "n_jitters": 3}
        )


def test_jitter_probabilities_reach_the_views(monkeypatch):
    """p_flip / p_zoom are passed to every jitter draw: 0 gives unflipped, unzoomed views (pads only)."""
    import featup.core.training as training

    seen = []
    real = training.sample_jitter

    def spy(*args, **kwargs):
        params = real(*args, **kwargs)
        seen.append(params)
        return params

    monkeypatch.setattr(training, "sample_jitter", spy)
    backbone = PooledPointwise()
    train_jbu(backbone, regions(2, 24, seed=1), steps=3, p_flip=0.0, p_zoom=0.0, **JBU_FAST)
    fit_implicit(backbone, regions(1, 24, seed=2), steps=2, p_flip=0.0, p_zoom=0.0, **IMP_FAST)
    assert len(seen) > 4 and not any(p.flip or p.zoom != 1.0 for p in seen)
    seen.clear()
    train_jbu(backbone, regions(2, 24, seed=1), steps=3, p_flip=1.0, p_zoom=1.0, **JBU_FAST)
    assert seen and all(p.flip and p.zoom > 1.0 for p in seen)


def test_uncertainty_false_trains_on_plain_mse(tmp_path, monkeypatch):
    """uncertainty=False: no scale head (nothing of it checkpointed), every loss call has s = 1, and it
    still learns; resuming with the other setting is refused."""
    import featup.core.training as training

    scales = []
    real = training.reconstruction_loss

    def spy(pred, target, log_scale=None):
        scales.append(log_scale)
        return real(pred, target, log_scale)

    monkeypatch.setattr(training, "reconstruction_loss", spy)
    backbone = PooledPointwise()
    images = regions(8, 32, seed=21)
    up = train_jbu(backbone, images, steps=30, uncertainty=False, checkpoint_dir=tmp_path, **JBU_FAST)
    assert scales and all(s is None for s in scales)
    assert upsample_error(up, backbone, images) < upsample_error(None, backbone, images)
    state = load_checkpoint(tmp_path / JBU_STATE_FILE)
    assert not any(k.startswith("head.") for k in state[0]) and state[1]["hparams"]["uncertainty"] is False
    with pytest.raises(CheckpointError, match="uncertainty"):
        train_jbu(backbone, images, steps=31, checkpoint_dir=tmp_path, **JBU_FAST)
    scales.clear()
    fit_implicit(backbone, images[:1], steps=2, uncertainty=False, **IMP_FAST)
    assert scales and all(s is None for s in scales)
    scales.clear()
    train_jbu(backbone, images, steps=2, **JBU_FAST)  # the default keeps eq. 1's learned scale
    assert scales and all(s is not None for s in scales)


def test_corrupted_training_state_is_a_clear_error(tmp_path):
    backbone = PooledPointwise()
    images = regions(4, 24, seed=10)
    train_jbu(backbone, images, steps=1, checkpoint_dir=tmp_path, **JBU_FAST)
    state = tmp_path / JBU_STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        train_jbu(backbone, images, steps=2, checkpoint_dir=tmp_path, **JBU_FAST)


def test_callback_returning_true_stops_and_checkpoints(tmp_path):
    backbone = PooledPointwise()
    images = regions(4, 24, seed=11)
    seen: list[int] = []

    def stop_at_3(step: int, logs: dict) -> bool:
        seen.append(step)
        assert set(logs) >= {"loss", "rec_loss", "tv_loss"}
        return step == 3

    train_jbu(
        backbone,
        images,
        steps=10,
        checkpoint_dir=tmp_path,
        checkpoint_every=100,
        callback=stop_at_3,
        **JBU_FAST,
    )
    assert seen == [1, 2, 3]
    assert load_checkpoint(tmp_path / JBU_STATE_FILE)[1]["step"] == 3


# ----------------------------------------------------------------------------------------------------------
# inputs


def test_train_jbu_accepts_lists_datasets_and_dataloaders():
    backbone = PooledPointwise()
    images = regions(8, 24, seed=12)
    from_tensor = params_of(train_jbu(backbone, images, steps=2, **JBU_FAST))

    class Images(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            return images[i], i  # (image, label) pairs as labelled datasets yield them

    from_dataset = params_of(train_jbu(backbone, Images(), steps=2, **JBU_FAST))
    assert_bitwise_equal(from_tensor, from_dataset)  # same indices, same batches
    batches = [images[:4], images[4:]]
    train_jbu(backbone, batches, steps=3, **JBU_FAST)  # cycles the list
    loader = DataLoader(TensorDataset(images), batch_size=4, shuffle=True)
    a = params_of(train_jbu(backbone, loader, steps=3, **JBU_FAST))
    b = params_of(train_jbu(backbone, loader, steps=3, **JBU_FAST))
    assert_bitwise_equal(a, b)  # a shuffling DataLoader is seeded by the run


def test_train_jbu_odd_non_square_images_and_given_upsampler():
    backbone = PooledPointwise()
    images = regions(4, (20, 28), seed=13)
    up = JBUStack(radius=1, key_dim=8)
    out = train_jbu(backbone, images, steps=2, upsampler=up, **JBU_FAST)
    assert out is up and not out.training
    with torch.no_grad():
        assert out(backbone(images), images).shape == (4, 8, 20, 28)


def test_backbone_mode_restored():
    backbone = PooledPointwise().train()
    train_jbu(backbone, regions(4, 24), steps=1, **JBU_FAST)
    assert backbone.training


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "match"),
    [
        (torch.rand(3, 24, 24), {}, ValueError, r"\(B,3,H,W\).*\(3, 24, 24\).*batch dimension"),
        (torch.rand(2, 4, 24, 24), {}, ValueError, r"\(B,3,H,W\).*\(2, 4, 24, 24\)"),
        (torch.rand(2, 3, 24, 24) * 255, {}, ValueError, r"\[0,1\]"),
        (torch.randint(0, 2, (2, 3, 24, 24)), {}, ValueError, "floating-point"),
        ("images/", {}, TypeError, "expected images"),
        (torch.rand(2, 3, 24, 24), {"steps": 0}, ValueError, "steps >= 1"),
        (torch.rand(2, 3, 24, 24), {"steps": 2.5}, TypeError, "steps"),
        (torch.rand(2, 3, 24, 24), {"batch_size": 0}, ValueError, "batch_size"),
        (torch.rand(2, 3, 24, 24), {"lr": -1.0}, ValueError, "lr"),
        (torch.rand(2, 3, 24, 24), {"downsampler": "max"}, ValueError, "downsampler"),
        (torch.rand(2, 3, 24, 24), {"max_zoom": 0.5}, ValueError, "max_zoom"),
        (torch.rand(2, 3, 24, 24), {"p_flip": 1.5}, ValueError, r"p_flip in \[0, 1\]"),
        (torch.rand(2, 3, 24, 24), {"p_zoom": -0.1}, ValueError, "p_zoom"),
        (torch.rand(2, 3, 24, 24), {"p_flip": "yes"}, TypeError, "p_flip"),
        (torch.rand(2, 3, 24, 24), {"uncertainty": "no"}, TypeError, r"uncertainty as True or False.*'no'"),
        ([], {}, ValueError, "at least one"),
        ([torch.rand(3, 24, 24)], {}, ValueError, r"\(B,3,H,W\)"),
    ],
)
def test_train_jbu_bad_inputs(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        train_jbu(PooledPointwise(), images, **{"steps": 1, **JBU_FAST, **kwargs})


def test_one_shot_iterator_that_runs_out_is_a_clear_error():
    batches = iter([regions(2, 24)])
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_jbu(PooledPointwise(), batches, steps=3, **JBU_FAST)


def test_bad_backbones():
    images = regions(2, 24)
    with pytest.raises(TypeError, match="callable"):
        train_jbu("dino", images, steps=1, **JBU_FAST)
    with pytest.raises(ValueError, match=r"features \(B,C,h,w\).*got shape \(\d, 8, 6\)"):
        train_jbu(lambda x: PooledPointwise()(x)[:, :, 0], images, steps=1, **JBU_FAST)
    with pytest.raises(ValueError, match=r"B=4 for images \(4, 3, 24, 24\), got shape \(1, 8, 6, 6\)"):
        train_jbu(lambda x: PooledPointwise()(x)[:1], images, steps=1, **JBU_FAST)
    with pytest.raises(TypeError, match="return a tensor"):
        train_jbu(lambda x: [PooledPointwise()(x)], images, steps=1, **JBU_FAST)


def test_fit_implicit_bad_inputs():
    backbone = PooledPointwise()
    with pytest.raises(ValueError, match=r"one image \(1,3,H,W\)"):
        fit_implicit(backbone, regions(2, 24), steps=1, **IMP_FAST)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        fit_implicit(backbone, torch.rand(3, 24, 24), steps=1, **IMP_FAST)
    with pytest.raises(ValueError, match="steps >= 1"):
        fit_implicit(backbone, regions(1, 24), steps=0, **IMP_FAST)
    with pytest.raises(ValueError, match="tv_weight"):
        fit_implicit(backbone, regions(1, 24), steps=1, tv_weight=-0.1, **IMP_FAST)
    with pytest.raises(ValueError, match=r"features \(B,C,h,w\)"):
        fit_implicit(lambda x: backbone(x).flatten(2), regions(1, 24), steps=1, **IMP_FAST)


# ----------------------------------------------------------------------------------------------------------
# data order (the DistributedSampler equivalent)


def test_shard_indices_partition_each_epoch_and_reshuffle():
    n, world = 10, 3
    for epoch in range(3):
        shards = [dist_utils.shard_indices(n, epoch, 5, r, world) for r in range(world)]
        assert all(len(s) == 4 for s in shards)  # ceil(10 / 3), padded by wrapping around
        flat = torch.cat(shards).tolist()
        assert set(flat) == set(range(n)) and len(flat) == 12
        again = [dist_utils.shard_indices(n, epoch, 5, r, world) for r in range(world)]
        assert all(torch.equal(a, b) for a, b in zip(shards, again))
    assert not torch.equal(dist_utils.shard_indices(n, 0, 5, 0, 1), dist_utils.shard_indices(n, 1, 5, 0, 1))


def test_sources_shard_batches_over_ranks():
    ctxs = [dist_utils.DistContext(rank=r, world_size=2) for r in range(2)]
    indexed = [IndexedSource(lambda i: torch.tensor(i), 7, 3, 0, c) for c in ctxs]
    for step in range(3):
        a, b = (s.indices(step) for s in indexed)
        assert len(a) == len(b) == 3
    epoch0 = [set(s.indices(0) + s.indices(1)[:1]) for s in indexed]  # 4 = ceil(7/2) images per rank
    assert len(epoch0[0] | epoch0[1]) == 7  # together the ranks cover the corpus in one epoch
    batches = [torch.full((1, 3, 2, 2), i / 10) for i in range(5)]
    streams = [IterableSource(batches, 0, c, shard=True) for c in ctxs]
    got = [[float(s.batch(k)[0, 0, 0, 0]) * 10 for k in range(4)] for s in streams]
    assert [round(v) for v in got[0]] == [0, 2, 4, 1]  # global batches 0, 2, 4, 6 -> cycled 6 = 1
    assert [round(v) for v in got[1]] == [1, 3, 0, 2]
    single = make_source(batches, 4, 0, dist_utils.DistContext())
    assert round(float(single.batch(6)[0, 0, 0, 0]) * 10) == 1


def test_training_works_when_called_inside_inference_mode():
    backbone = PooledPointwise()
    up = JBUStack()
    before = params_of(up)
    with torch.inference_mode():
        images, image = regions(4, 24, seed=14), regions(1, 24, seed=15)
        train_jbu(backbone, images, steps=2, upsampler=up, **JBU_FAST)
        imp = fit_implicit(backbone, image, steps=2, **IMP_FAST)
    assert not up.training and not imp.training
    after = params_of(up)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
    assert all(torch.isfinite(p).all() for p in imp.parameters())
