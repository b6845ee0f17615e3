"""train_jbu and fit_implicit against a plain re-computation of their first steps, bitwise.

Each reference below is eq. 1 written out with the public building blocks (jitters, backbone, upsampler,
downsampler, uncertainty head, loss, NAdam) and the documented seed scheme, one step after the other and
without any of the trainers' structure (no shared objective module, no step loop, no checkpointing). The
trainers must give the same losses and parameters to the bit, so any restructuring of the training code that
changes a number, an RNG draw or their order fails here.
"""

from __future__ import annotations

import pytest
import torch
from core_toys import PooledPointwise

from featup.core import fit_implicit, train_jbu
from featup.core._train_data import derive_seed
from featup.core.downsamplers import create_downsampler
from featup.core.implicit import ImplicitUpsampler
from featup.core.jbu import JBUStack
from featup.core.jitter import apply_jitter, sample_jitter
from featup.core.losses import UncertaintyHead, project, random_projection, reconstruction_loss, tv_loss
from featup.core.pca import PCA

torch.set_num_threads(1)

STEPS = 3
LR = 5e-3
KERNEL = 4
HIDDEN = {"hidden_dim": 32, "n_freqs": 8}


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random RGB images in [0, 1] (bilinear upsampling of 6x6 noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size, mode="bilinear")


def _recording(losses: list[float]):
    return lambda step, logs: losses.append(logs["loss"])


def _reference_jbu(
    backbone, batches, *, seed, lr, n_jitters, proj_dim, kernel_size, downsampler, blur, **jit
):
    """Table 7's JBU step, plainly: one F_hr per batch, each jitter's projected eq. 1, averaged; NAdam."""
    with torch.random.fork_rng(devices=[]):
        feat_dim = int(backbone(batches[0][:1]).shape[1])
        torch.default_generator.manual_seed(derive_seed(seed, "init"))
        up = JBUStack()
        down = create_downsampler(downsampler, feat_dim, kernel_size, blur=blur)
        head = UncertaintyHead(feat_dim)
        named = [
            (f"{m}.{n}", p)
            for m, mod in (("u", up), ("d", down), ("h", head))
            for n, p in mod.named_parameters()
        ]
        rest = [p for n, p in named if not n.endswith(".gate")]
        gates = [p for n, p in named if n.endswith(".gate")]
        optimizer = torch.optim.NAdam([{"params": rest}, {"params": gates}], lr=lr)
        for module in (up, down, head):
            module.train()
        losses = []
        for step in range(STEPS):
            x = batches[step % len(batches)]
            torch.default_generator.manual_seed(derive_seed(seed, "dropout", 0, step))
            gen = torch.Generator().manual_seed(derive_seed(seed, "jitter", 0, step))
            jitters = [[sample_jitter(gen, **jit) for _ in range(x.shape[0])] for _ in range(n_jitters)]
            with torch.no_grad():
                lr_feats = backbone(x)
                views = apply_jitter(x.repeat(n_jitters, 1, 1, 1), [p for ps in jitters for p in ps])
                targets = backbone(views).chunk(n_jitters)
            proj = random_projection(feat_dim, proj_dim, generator=gen)
            hr = up(lr_feats, x)
            loss = hr.new_zeros(())
            for params, target in zip(jitters, targets):
                pred = down(apply_jitter(hr, params), tuple(target.shape[-2:]))
                loss = loss + reconstruction_loss(project(pred, proj), project(target, proj), head(target))
            loss = loss / n_jitters
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses, up


@pytest.mark.parametrize("downsampler", ["attention", "simple"])
def test_train_jbu_matches_the_plain_computation_bitwise(downsampler):
    backbone = PooledPointwise()
    batches = list(images(6, 24, seed=11).split(3))
    settings = dict(seed=4, lr=LR, n_jitters=2, proj_dim=5, kernel_size=KERNEL)
    jit = dict(max_pad=6, max_zoom=1.5, p_zoom=0.5, p_flip=0.5)
    losses: list[float] = []
    up = train_jbu(
        backbone,
        batches,
        steps=STEPS,
        downsampler=downsampler,
        blur=True,
        project_first=False,
        callback=_recording(losses),
        progress=False,
        **settings,
        **jit,
    )
    ref_losses, ref_up = _reference_jbu(
        backbone, batches, downsampler=downsampler, blur=True, **settings, **jit
    )
    assert losses == ref_losses
    for (name, p), q in zip(up.state_dict().items(), ref_up.state_dict().values()):
        assert torch.equal(p, q), name


def _reference_implicit(
    backbone, image, *, seed, lr, n_jitters, pca_dim, kernel_size, tv_weight, hidden, **jit
):
    """The paper's implicit fit, plainly: PCA targets of fresh views each step, eq. 1 + TV (eq. 8); NAdam."""
    with torch.random.fork_rng(devices=[]):
        lr_feats = backbone(image)
        torch.default_generator.manual_seed(derive_seed(seed, "init"))
        pca = PCA(lr_feats.shape[1], pca_dim).fit(lr_feats)
        imp = ImplicitUpsampler(lr_feats.shape[1], list(image.shape[-2:]), pca_dim=pca_dim, **hidden)
        imp.set_image(image)
        imp.set_pca(pca)
        down = create_downsampler("simple", imp.pca_dim, kernel_size)
        head = UncertaintyHead(imp.pca_dim)
        params = [p for m in (imp, down, head) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.NAdam(params, lr=lr)
        for module in (imp, down, head):
            module.train()
        losses = []
        for step in range(STEPS):
            torch.default_generator.manual_seed(derive_seed(seed, "dropout", 0, step))
            gen = torch.Generator().manual_seed(derive_seed(seed, "jitter", 0, step))
            jitters = [sample_jitter(gen, **jit) for _ in range(n_jitters)]
            with torch.no_grad():
                targets = imp.pca.transform(
                    backbone(apply_jitter(image.expand(n_jitters, -1, -1, -1), jitters))
                )
            hr = imp.forward_compressed(image)
            pred = down(apply_jitter(hr.expand(n_jitters, -1, -1, -1), jitters), tuple(targets.shape[-2:]))
            loss = reconstruction_loss(pred, targets, head(targets)) + tv_weight * tv_loss(hr)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses, imp


def test_fit_implicit_matches_the_plain_computation_bitwise():
    backbone = PooledPointwise()
    image = images(1, 24, seed=12)
    settings = dict(seed=6, lr=LR, n_jitters=3, pca_dim=4, kernel_size=KERNEL)
    jit = dict(max_pad=6, max_zoom=1.5, p_zoom=0.5, p_flip=0.5)
    losses: list[float] = []
    imp = fit_implicit(
        backbone,
        image,
        steps=STEPS,
        preset="paper",  # fresh views every step, the plain pooling path, no residual start
        downsampler="simple",
        tv_weight=0.05,
        upsampler_kwargs=HIDDEN,
        callback=_recording(losses),
        progress=False,
        **settings,
        **jit,
    )
    ref_losses, ref_imp = _reference_implicit(
        backbone, image, tv_weight=0.05, hidden=HIDDEN, **settings, **jit
    )
    assert losses == ref_losses
    for (name, p), q in zip(imp.state_dict().items(), ref_imp.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_old_import_path_keeps_its_names_and_forwards_patches(monkeypatch):
    """featup.core.training was one module; code imports (and tests patch) these names on it."""
    import featup.core.multiview as multiview
    import featup.core.training as training

    names = (
        "train_jbu fit_implicit JBUTrainConfig ImplicitFitConfig JBU_MODEL_FILE JBU_STATE_FILE Callback "
        "channel_linear _JBUObjective _training_context _features _frozen _resolve_device _seed_rngs "
        "_check_finite_loss _check_finite_features _step_logs _check_int _check_float _check_bool "
        "_check_probability window_pool apply_jitter random_projection project create_downsampler "
        "reconstruction_loss sample_jitter make_grad_scaler"
    ).split()
    assert [n for n in names if not hasattr(training, n)] == []
    real = multiview.reconstruction_loss
    monkeypatch.setattr(training, "reconstruction_loss", len)
    assert multiview.reconstruction_loss is len and training.reconstruction_loss is len
    monkeypatch.undo()
    assert multiview.reconstruction_loss is real and "reconstruction_loss" not in vars(training)
