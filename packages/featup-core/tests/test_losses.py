"""Losses: eq. 1 vs its formula and its optimum, eq. 8 vs loops, JL norm preservation, projection."""

from __future__ import annotations

import math

import pytest
import torch

from featup.core.losses import UncertaintyHead, project, random_projection, reconstruction_loss, tv_loss


def test_reconstruction_loss_formula():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    log_s = torch.randn(2, 1, 3, 4, generator=gen, dtype=torch.float64)
    expected = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                e = ((pred[b, :, i, j] - target[b, :, i, j]) ** 2).mean()
                s = math.exp(log_s[b, 0, i, j])
                expected += e / (2 * s * s) + math.log(s)
    torch.testing.assert_close(reconstruction_loss(pred, target, log_s), expected / 24)
    torch.testing.assert_close(reconstruction_loss(pred, target), 0.5 * (pred - target).square().mean())


def test_reconstruction_optimal_scale_is_rms_error():
    """d/ds of e/(2 s^2) + log s vanishes at s^2 = e: the learned scale estimates the per-pixel error."""
    err = torch.tensor([0.25, 4.0], dtype=torch.float64)
    pred = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    target = err.sqrt().view(1, 1, 1, 2)
    log_s = torch.zeros(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_s], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = reconstruction_loss(pred, target, log_s)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(torch.exp(2 * log_s.detach()).flatten(), err, atol=1e-5, rtol=1e-5)


def test_uncertainty_head_starts_at_unit_scale_and_learns():
    head = UncertaintyHead(6)
    target = torch.randn(2, 6, 5, 7)
    out = head(target)
    assert out.shape == (2, 1, 5, 7) and torch.equal(out, torch.zeros_like(out))
    pred = torch.zeros_like(target)
    loss = reconstruction_loss(pred, target, head(target))
    loss.backward()
    assert head.conv.weight.grad.abs().sum() > 0 and head.conv.bias.grad.abs().sum() > 0


def test_reconstruction_gradcheck():
    gen = torch.Generator().manual_seed(1)
    args = [
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((1, 3, 2, 3),) * 2
    ]
    log_s = torch.randn(1, 1, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reconstruction_loss, (*args, log_s))


def test_tv_loss_matches_eq8_loops_and_gradcheck():
    gen = torch.Generator().manual_seed(2)
    hr = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    mag = hr.norm(dim=1)
    total = 0.0
    for b in range(2):
        for i in range(5):
            for j in range(6):
                if i > 0:
                    total += (mag[b, i, j] - mag[b, i - 1, j]) ** 2
                if j > 0:
                    total += (mag[b, i, j] - mag[b, i, j - 1]) ** 2
    torch.testing.assert_close(tv_loss(hr), total / (2 * 5 * 6))
    x = hr[:1, :, :3, :4].clone().requires_grad_()
    assert torch.autograd.gradcheck(tv_loss, (x,))


def test_tv_loss_invariants():
    # only magnitudes matter: a per-pixel rotation of the feature vector (here a sign flip) changes nothing
    hr = torch.randn(1, 3, 8, 9)
    signs = torch.where(torch.rand(1, 1, 8, 9) > 0.5, 1.0, -1.0)
    torch.testing.assert_close(tv_loss(hr * signs), tv_loss(hr))
    assert tv_loss(torch.ones(1, 3, 8, 9) * 2.5) == 0
    # finite gradient where features vanish
    z = torch.zeros(1, 2, 4, 4, requires_grad=True)
    tv_loss(z).backward()
    assert torch.isfinite(z.grad).all()


def test_random_projection_preserves_norms():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 384, 10, 10, generator=gen)
    mat = random_projection(384, 256, generator=gen)
    assert mat.shape == (384, 256)
    ratio = (project(feats, mat).norm(dim=1) / feats.norm(dim=1)).flatten()
    # JL: relative norm distortion ~ 1/sqrt(2 * 256) = 0.044 standard deviation
    assert abs(ratio.mean().item() - 1) < 0.02
    assert (ratio - 1).abs().max() < 0.25
    # pairwise distances too
    a, b = feats[0, :, 0, 0], feats[0, :, 3, 7]
    assert abs(((a - b) @ mat).norm() / (a - b).norm() - 1) < 0.25


def test_random_projection_seeded_and_placed():
    a = random_projection(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = random_projection(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(a, b) and a.dtype == torch.float64
    c = random_projection(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert not torch.equal(a, c)


def test_project_matches_matmul():
    feats = torch.randn(2, 5, 3, 7)
    mat = torch.randn(5, 4)
    out = project(feats, mat)
    assert out.shape == (2, 4, 3, 7)
    torch.testing.assert_close(out, (feats.permute(0, 2, 3, 1) @ mat).permute(0, 3, 1, 2))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match="log_scale"):
        reconstruction_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B,C,H,W\)"):
        tv_loss(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="rows"):
        project(torch.zeros(1, 3, 2, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="channels"):
        UncertaintyHead(4)(torch.zeros(1, 3, 2, 2))


def test_reconstruction_scale_floor_bounds_the_likelihood():
    """eq. 1 with an unfloored scale runs to minus infinity as s -> 0 on a perfect fit; the floor (the
    original's clamp_min(1e-4)) stops it there and gives the scale no gradient below it."""
    import math

    from featup.core.losses import MIN_SCALE

    pred = torch.zeros(1, 2, 3, 3)
    target = pred.clone()
    log_s = torch.full((1, 1, 3, 3), -20.0, requires_grad=True)
    floored = reconstruction_loss(pred, target, log_s)
    assert float(floored.detach()) == pytest.approx(math.log(MIN_SCALE))
    floored.backward()
    assert torch.all(log_s.grad == 0)
    assert float(reconstruction_loss(pred, target, log_s.detach(), min_scale=None)) < -19
    # above the floor nothing changes
    mid = torch.full((1, 1, 3, 3), -1.0)
    assert torch.equal(
        reconstruction_loss(pred, target, mid), reconstruction_loss(pred, target, mid, min_scale=None)
    )
    with pytest.raises(ValueError, match="min_scale"):
        reconstruction_loss(pred, target, mid, min_scale=0.0)
