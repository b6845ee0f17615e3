"""Back-projection (featup.core.consistency) and the JBU stack's consistency step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from core_toys import assert_fused_gradients_equal_plain, randomize_jbu

import featup.core.jbu as jbu_module
from featup.core import JBUStack, create_upsampler
from featup.core.consistency import back_project, block_mean, pool_to
from featup.core.implicit import ImplicitUpsampler
from featup.core.pca import PCA


def _pooled_error(hr: torch.Tensor, lr: torch.Tensor) -> float:
    return float((pool_to(hr, tuple(lr.shape[-2:])) - lr).abs().max())


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("lr_size", "size"), [((7, 5), (112, 80)), ((6, 9), (37, 50)), ((4, 4), (4, 9)), ((14, 14), (15, 29))]
)
def test_the_output_pools_back_to_lr_exactly(mode, lr_size, size):
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(2, 3, *lr_size, generator=g, dtype=torch.float64)
    hr = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)  # unrelated to lr: a large error
    assert _pooled_error(hr, lr) > 1.0
    assert _pooled_error(back_project(hr, lr, mode=mode), lr) < 1e-10
    one = back_project(hr.float(), lr.float(), mode=mode)
    assert one.dtype == torch.float32 and _pooled_error(one, lr.float()) < 1e-4


@pytest.mark.parametrize("blocks", [(16, 6), (2, 2), (3, 1), (1, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d"])
def test_block_mean_is_avg_pool2d(layout, blocks):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 48, 30, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "3d":
        x = x[0]
    x.requires_grad_(True)
    out = block_mean(x, *blocks)
    ref = F.avg_pool2d(x, blocks)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(block_mean(x.float(), *blocks), ref.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(pool_to(x, (48 // blocks[0], 30 // blocks[1])), ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="dividing the map"):
        block_mean(x, 5, 6)


def test_a_consistent_map_is_left_unchanged():
    g = torch.Generator().manual_seed(1)
    hr = torch.randn(1, 4, 48, 32, generator=g, dtype=torch.float64)
    lr = F.avg_pool2d(hr, 8)  # hr already pools back to lr exactly
    torch.testing.assert_close(back_project(hr, lr), hr, atol=1e-12, rtol=0)


def test_back_projection_is_the_limit_of_plain_back_projection_steps():
    """Against the definition: iterating hr <- hr + bicubic(lr - cell means of hr) converges to it."""
    g = torch.Generator().manual_seed(2)
    hr = torch.randn(1, 2, 40, 24, generator=g, dtype=torch.float64)
    lr = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64)
    it = hr
    for _ in range(60):
        means = it.view(1, 2, 5, 8, 3, 8).mean((3, 5))
        it = it + F.interpolate(lr - means, size=(40, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(back_project(hr, lr), it, atol=1e-9, rtol=0)


def test_inplace_equals_out_of_place_and_refuses_autograd():
    g = torch.Generator().manual_seed(3)
    hr, lr = torch.randn(2, 70, 32, 32, generator=g), torch.randn(2, 70, 4, 4, generator=g)
    expected = back_project(hr, lr)
    inplace = hr.clone()
    out = back_project(inplace, lr, inplace=True, chunk_channels=16)
    assert out.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="requires grad"):
        back_project(hr.clone().requires_grad_(True), lr, inplace=True)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    hr = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lr = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(back_project, (hr, lr))


@pytest.mark.parametrize(
    ("hr_shape", "lr_shape", "kwargs", "match"),
    [
        ((1, 3, 8, 8), (1, 4, 2, 2), {}, "same B and C"),
        ((1, 3, 8, 8), (3, 2, 2), {}, "same B and C"),
        ((1, 3, 2, 8), (1, 3, 4, 4), {}, "at least as large"),
        ((1, 3, 8, 8), (1, 3, 2, 2), {"mode": "nearest"}, "mode"),
        ((1, 3, 8, 8), (1, 3, 2, 2), {"chunk_channels": 0}, "chunk_channels"),
    ],
)
def test_bad_arguments_say_what_was_expected(hr_shape, lr_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        back_project(torch.zeros(hr_shape), torch.zeros(lr_shape), **kwargs)


# ------------------------------------------------------------------------------------------ in the JBU stack
def test_jbu_output_pools_back_to_its_input_features():
    """The default stack's output keeps the input's cell means (the paper's form does not)."""
    torch.manual_seed(0)
    x, image = torch.randn(2, 6, 7, 7), torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        default, paper = JBUStack().eval(), create_upsampler("jbu_paper").eval()
        for stage in default.stages:  # a trained-looking stack: gates and corrections away from zero
            stage.gate.fill_(0.7)
        err_default = _pooled_error(default(x, image), x)
        err_paper = _pooled_error(paper(x, image), x)
        default.consistency = False
        err_off = _pooled_error(default(x, image), x)
    assert err_default < 1e-4 < 0.1 * min(err_paper, err_off)
    assert JBUStack().config()["consistency"] is True and paper.config()["consistency"] is False
    assert create_upsampler("jbu_original", feat_dim=6).consistency is False  # the original layout, exactly


def test_jbu_consistency_is_back_projection_of_the_stack_without_it():
    torch.manual_seed(1)
    x, image = torch.randn(1, 5, 6, 9), torch.rand(1, 3, 61, 75)
    with_c = JBUStack().eval()
    without = JBUStack(consistency=False).eval()
    without.load_state_dict(with_c.state_dict())
    with torch.no_grad():
        for stage in (*with_c.stages, *without.stages):
            stage.gate.fill_(0.5)
        torch.testing.assert_close(with_c(x, image), back_project(without(x, image), x))
        # a target smaller than the features: no back-projection (it would be a downsampling)
        torch.testing.assert_close(with_c(x, image, (3, 4)), without(x, image, (3, 4)))


@pytest.mark.parametrize("fused", [True, False])
def test_jbu_consistency_strength_moves_the_output_that_far_towards_its_back_projection(fused):
    torch.manual_seed(2)
    x = torch.randn(1, 5, 7, 7, dtype=torch.float64)
    image = torch.rand(1, 3, 112, 112, dtype=torch.float64)
    full = JBUStack().double().eval()
    with torch.no_grad():
        for stage in full.stages:
            stage.gate.fill_(0.6)
    stacks = {}
    for a in (0.0, 0.3, 1.0):
        up = JBUStack(consistency_strength=a).double().eval()
        up.load_state_dict(full.state_dict())
        up.fused = fused
        stacks[a] = up
    without = JBUStack(consistency=False).double().eval()
    without.load_state_dict(full.state_dict())
    without.fused = fused
    with torch.no_grad():
        pre, bp = without(x, image), back_project(without(x, image), x)
        torch.testing.assert_close(stacks[1.0](x, image), bp, atol=1e-10, rtol=0)
        torch.testing.assert_close(stacks[0.0](x, image), pre, atol=1e-10, rtol=0)
        out = stacks[0.3](x, image)
        torch.testing.assert_close(out, pre + 0.3 * (bp - pre), atol=1e-10, rtol=0)
        # the cell means close 30% of the gap to the input's
        torch.testing.assert_close(
            pool_to(out, (7, 7)) - x, 0.7 * (pool_to(pre, (7, 7)) - x), atol=1e-10, rtol=0
        )


def test_jbu_consistency_strength_is_saved_checked_and_differentiable(tmp_path):
    up = JBUStack(key_dim=4, n_stages=2, consistency_strength=0.25)
    assert up.config()["consistency_strength"] == 0.25
    assert JBUStack.load(up.save(tmp_path / "a")).consistency_strength == 0.25
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    up.train()(x, torch.rand(1, 3, 16, 16)).square().sum().backward()
    assert x.grad is not None and all(s.gate.grad is not None for s in up.stages)
    for bad, err in ((1.5, ValueError), (-0.1, ValueError), (True, TypeError), ("half", TypeError)):
        with pytest.raises(err, match="consistency_strength"):
            JBUStack(consistency_strength=bad)


def test_back_project_takes_given_cell_means():
    g = torch.Generator().manual_seed(5)
    hr = torch.randn(2, 3, 48, 40, generator=g, dtype=torch.float64)
    lr = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    given = back_project(hr, lr, hr_means=F.avg_pool2d(hr, 8))
    torch.testing.assert_close(given, back_project(hr, lr), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="hr_means of lr's shape"):
        back_project(hr, lr, hr_means=F.avg_pool2d(hr, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("lr_size", "size", "kwargs", "pooled_in_op"),
    [
        ((7, 5), (112, 80), {}, True),  # 16x: the last stage's op takes the cell means
        ((6, 9), (24, 18), {"n_stages": 2}, True),  # 4x and 2x: one stage is 1x along the columns
        ((7, 5), (109, 83), {}, False),  # cells do not tile the output: pooled afterwards
        ((7, 5), (112, 80), {"feat_dim": 4}, False),  # a projection follows the last stage
    ],
)
def test_jbu_back_projection_with_the_means_of_the_last_stages_op(
    monkeypatch, dtype, lr_size, size, kwargs, pooled_in_op
):
    if not jbu_module.has_adaptive_conv_phases_pooled("cpu"):
        pytest.skip("this featup-kernels build predates adaptive_conv_phases_pooled")
    # the pooled means are the path without the fused back-projection (test_jbu_lifted.py tests that one)
    monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases_lifted", lambda device="cpu": False)
    up = randomize_jbu(JBUStack(**kwargs), seed=2, gate=0.8).to(dtype)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, *lr_size, generator=g, dtype=dtype)
    image = torch.rand(2, 3, *size, generator=g, dtype=dtype)
    calls = []
    op = jbu_module.adaptive_conv_phases_pooled
    monkeypatch.setattr(jbu_module, "adaptive_conv_phases_pooled", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        out = up(x, image)
        assert len(calls) == int(pooled_in_op)
        monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases_pooled", lambda device="cpu": False)
        without_op = up(x, image)
        up.fused = False
        plain = up(x, image)
    scale = float(plain.abs().max())
    if dtype == torch.float64:
        torch.testing.assert_close(out, without_op, atol=1e-10, rtol=0)
        torch.testing.assert_close(out, plain, atol=1e-10, rtol=0)
    else:  # only the order of the cell sums differs (the fused path against the plain one: test_jbu*.py)
        torch.testing.assert_close(out, without_op, atol=1e-6 * scale, rtol=0)
    assert _pooled_error(out, x) < (1e-10 if dtype == torch.float64 else 1e-5 * scale)


def test_jbu_back_projection_takes_no_op_means_when_a_gradient_is_needed(monkeypatch):
    calls = []
    op = jbu_module.adaptive_conv_phases_pooled
    monkeypatch.setattr(jbu_module, "adaptive_conv_phases_pooled", lambda *a: calls.append(1) or op(*a))
    up = randomize_jbu(JBUStack(n_stages=2, key_dim=4), seed=3, gate=0.6).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 5, 4, generator=g, dtype=torch.float64)
    image = torch.rand(1, 3, 20, 16, generator=g, dtype=torch.float64)
    assert_fused_gradients_equal_plain(up, x, image)
    assert not calls  # the op has no backward: the features' means are pooled by differentiable ops


def test_jbu_consistency_is_differentiable_in_training():
    up = JBUStack(key_dim=4, n_stages=2).train()
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    up(x, torch.rand(1, 3, 16, 16)).square().sum().backward()
    assert x.grad is not None and all(s.gate.grad is not None for s in up.stages)


def test_configs_saved_before_consistency_load_without_it(tmp_path):
    from safetensors.torch import load_file, save_file

    up = JBUStack(key_dim=8)
    with torch.no_grad():
        for stage in up.stages:
            stage.gate.fill_(0.3)
    path = up.save(tmp_path / "pre")
    cfg = json.loads((tmp_path / "pre.json").read_text())
    assert cfg["kwargs"].pop("consistency") is True
    (tmp_path / "pre.json").write_text(json.dumps(cfg))
    save_file(load_file(path), path, metadata={"format": "featup-checkpoint/1", "config": json.dumps(cfg)})
    loaded = JBUStack.load(path)
    assert loaded.consistency is False and loaded.consistency_strength == 1.0
    x, image = torch.randn(1, 3, 5, 6), torch.rand(1, 3, 40, 48)
    up.consistency = False
    torch.testing.assert_close(loaded(x, image), up.eval()(x, image), atol=0, rtol=0)
    with pytest.raises(TypeError, match="consistency"):
        JBUStack(consistency=1)


# ------------------------------------------------------------------------------------ in the implicit field
def _implicit(consistency: bool) -> ImplicitUpsampler:
    torch.manual_seed(0)
    imp = ImplicitUpsampler(6, (32, 40), hidden_dim=8, n_freqs=3, lr_size=(4, 5), consistency=consistency)
    imp.set_image(torch.rand(1, 3, 32, 40))
    imp.set_pca(PCA(6, 3).fit(torch.randn(1, 6, 4, 5)))
    return imp


def test_implicit_render_pools_back_to_the_stored_features():
    lr = torch.randn(1, 6, 4, 5)
    imp = _implicit(True)
    with pytest.raises(RuntimeError, match="set_lr"):
        imp.render()
    imp.set_lr(lr)
    for size in ((32, 40), (37, 41)):
        assert _pooled_error(imp.render(size), lr) < 1e-4
    plain = _implicit(
        False
    )  # the same field without it: far from lr (a PCA of 3 of 6 components, random MLP)
    plain.load_state_dict({k: v for k, v in imp.state_dict().items() if k not in ("lr_feats", "has_lr")})
    torch.testing.assert_close(imp.render(), back_project(plain.render(), lr), atol=1e-5, rtol=1e-5)
    assert _pooled_error(plain.render(), lr) > 0.1
    torch.testing.assert_close(imp.render(compressed=True), plain.render(compressed=True))  # the field alone
    with pytest.raises(ValueError, match=r"\(1, 6, 4, 5\)"):
        imp.set_lr(torch.zeros(1, 6, 5, 5))
    with pytest.raises(RuntimeError, match="consistency=True"):
        plain.set_lr(lr)


def test_implicit_consistency_round_trips_and_old_configs_load_without_it(tmp_path):
    imp = _implicit(True)
    imp.set_lr(torch.randn(1, 6, 4, 5))
    assert imp.config()["consistency"] is True
    loaded = ImplicitUpsampler.load(imp.save(tmp_path / "imp"))
    torch.testing.assert_close(loaded.render(), imp.render())
    assert "consistency" not in _implicit(False).config()  # configs saved before it stay as they were
    with pytest.raises(TypeError, match="consistency"):
        ImplicitUpsampler(6, (8, 8), lr_size=(2, 2), consistency=1)


def test_matrices_cached_under_inference_mode_serve_later_autograd_calls():
    # regression: _lift cached its matrices as inference tensors when first built inside inference_mode, and a
    # later call with autograd on the same sizes failed ("Inference tensors cannot be saved for backward")
    from featup.core.consistency import _lift

    _lift.cache_clear()
    # float64: the cached matrices are used as they are (no dtype conversion makes a fresh tensor)
    lr, hr = torch.randn(1, 2, 5, 7, dtype=torch.float64), torch.randn(1, 2, 37, 41, dtype=torch.float64)
    with torch.inference_mode():
        back_project(hr, lr)
    hr = hr.clone().requires_grad_(True)
    back_project(hr, lr).square().sum().backward()
    assert hr.grad is not None and torch.isfinite(hr.grad).all()
