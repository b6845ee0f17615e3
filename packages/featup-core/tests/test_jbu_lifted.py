"""The JBU's back-projection fused into its last stage (featup.kernels.footprint_sums and
adaptive_conv_phases_lifted): the cell means computed from the last stage's input, the correction added as each
output row is written. Against the unfused path (the op's pooled means, then back_project) and the plain path,
float64 to 1e-10 and float32 to float rounding; the fused ops stay off whenever a gradient is needed or under
autocast; older builds and other shapes fall back to the unfused path."""

from __future__ import annotations

import pytest
import torch
from core_toys import assert_fused_gradients_equal_plain, randomize_jbu

import featup.core.jbu as jbu_module
from featup.core import JBUStack
from featup.core.consistency import pool_to
from featup.core.jbu import apply_kernel_fused

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    not jbu_module.has_adaptive_conv_phases_lifted("cpu"),
    reason="this featup-kernels build predates adaptive_conv_phases_lifted",
)

# (lr size, output size, stack kwargs, whether the last stage adds the correction itself)
CASES = [
    ((14, 14), (224, 224), {}, True),  # the benchmark's 16x
    ((7, 5), (112, 80), {}, True),
    ((6, 9), (24, 18), {"n_stages": 2}, True),  # 4x and 2x: one stage is 1x along the columns
    ((3, 4), (24, 32), {"radius": 1, "pad_mode": "replicate"}, True),  # K = 3: footprints of 4 + 2
    ((7, 5), (109, 83), {}, False),  # cells do not tile the output: pooled afterwards
    ((7, 5), (112, 80), {"feat_dim": 4}, False),  # a projection follows the last stage
    ((4, 4), (8, 8), {"n_stages": 1}, True),  # one stage: the cells are 2x2 output pixels, 1 source pixel
]


def _count(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    op = getattr(jbu_module, name)
    monkeypatch.setattr(jbu_module, name, lambda *a: calls.append(1) or op(*a))
    return calls


def _data(lr_size, size, dtype, batch=2, channels=4, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *lr_size, generator=g, dtype=torch.float64).to(dtype)
    image = torch.rand(batch, 3, *size, generator=g, dtype=torch.float64).to(dtype)
    return x, image


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lr_size", "size", "kwargs", "lifted"), CASES)
def test_fused_back_projection_equals_the_unfused_and_plain_paths(
    monkeypatch, dtype, lr_size, size, kwargs, lifted
):
    up = randomize_jbu(JBUStack(**kwargs), seed=2, gate=0.8).to(dtype).eval()
    x, image = _data(lr_size, size, dtype)
    calls = _count(monkeypatch, "adaptive_conv_phases_lifted")
    with torch.inference_mode():
        out = up(x, image)
        assert len(calls) == int(lifted)
        monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases_lifted", lambda device="cpu": False)
        unfused = up(x, image)  # the previous path: the op's pooled means, then back_project
        assert len(calls) == int(lifted)
        up.fused = False
        plain = up(x, image)
    scale = float(plain.abs().max())
    if dtype == torch.float64:
        torch.testing.assert_close(out, unfused, atol=1e-10, rtol=0)
        torch.testing.assert_close(out, plain, atol=1e-10, rtol=0)
        assert float((pool_to(out, lr_size) - x).abs().max()) < 1e-10
    else:  # float32: no further from float64's result than the unfused path is
        with torch.inference_mode():
            up64 = up.double()
            up64.fused = True
            exact = up64(x.double(), image.double())
        err, err_unfused = float((out - exact).abs().max()), float((unfused - exact).abs().max())
        assert err <= max(2 * err_unfused, 2e-6 * scale), (err, err_unfused)
        assert float((pool_to(out, lr_size) - x).abs().max()) < 1e-5 * scale


def test_fresh_default_stack_matches_at_the_benchmark_size(monkeypatch):
    """A fresh `JBUStack()` (the benchmark's stack) at 384 channels: float32 equal to the unfused path to float
    rounding."""
    torch.manual_seed(0)
    up = JBUStack().eval()
    x, image = _data((14, 14), (224, 224), torch.float32, batch=1, channels=384, seed=1)
    calls = _count(monkeypatch, "adaptive_conv_phases_lifted")
    with torch.inference_mode():
        out = up(x, image)
        monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases_lifted", lambda device="cpu": False)
        unfused = up(x, image)
    assert calls == [1]
    torch.testing.assert_close(out, unfused, atol=2e-5 * float(unfused.abs().max()), rtol=1e-5)


def test_no_fused_back_projection_when_a_gradient_is_needed(monkeypatch):
    calls = _count(monkeypatch, "adaptive_conv_phases_lifted")
    up = randomize_jbu(JBUStack(n_stages=2, key_dim=4), seed=3, gate=0.6).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 5, 4, generator=g, dtype=torch.float64)
    image = torch.rand(1, 3, 20, 16, generator=g, dtype=torch.float64)
    assert_fused_gradients_equal_plain(up, x, image)
    with torch.no_grad():  # no gradient needed: the fused ops
        up(x, image)
    assert calls == [1]
    x.requires_grad_(True)
    up.eval()(x, image).sum().backward()  # features that need a gradient: the differentiable path
    assert calls == [1] and x.grad is not None


def test_no_fused_back_projection_under_autocast(monkeypatch):
    calls = _count(monkeypatch, "adaptive_conv_phases_lifted")
    up = randomize_jbu(JBUStack(n_stages=2, key_dim=4), seed=3, gate=0.6).eval()
    x, image = _data((5, 4), (20, 16), torch.float32, batch=1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x, image)
    assert not calls and torch.isfinite(out).all()


def test_apply_kernel_fused_back_project_to_arguments():
    g = torch.Generator().manual_seed(3)
    src, lr = torch.randn(1, 2, 6, 5, generator=g), torch.randn(1, 2, 3, 5, generator=g)
    kernel = torch.rand(1, 9, 12, 10, generator=g)
    with pytest.raises(ValueError, match="back_project_to or cell_means"):
        apply_kernel_fused(src, kernel, 1, back_project_to=lr, cell_means=(4, 2))
    with pytest.raises(ValueError, match="back_project_mode"):
        apply_kernel_fused(src, kernel, 1, back_project_to=lr, back_project_mode="nearest")
    with pytest.raises(ValueError, match="back_project_to"):
        apply_kernel_fused(src, kernel, 1, back_project_to=lr[:, :1])
    with pytest.raises(ValueError, match="back_project_to"):
        apply_kernel_fused(src, kernel, 1, back_project_to=torch.randn(1, 2, 13, 5))
