"""The JBU stages' composite filters straight from the compiled stage-kernel pass
(featup.kernels.jbu_stage_filters, via jbu._DeferredKernel): whole stacks against the path that computes the
K x K kernels and composes them with torch ops, and against the plain path; the op is used exactly where the
kernel op applies and a fused 1x / 2x stage needs filters; autograd and autocast keep the kernels path."""

from __future__ import annotations

import pytest
import torch
from core_toys import randomize_jbu

import featup.core.jbu as jbu_module
from featup.core import JBUStack

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    not jbu_module.has_jbu_stage_filters("cpu"), reason="this featup-kernels build predates jbu_stage_filters"
)

# (lr size, output size, stack kwargs)
CASES = [
    ((14, 14), (224, 224), {}),
    ((7, 5), (109, 83), {}),  # a last stage that is neither 1x nor 2x: the kernels path
    ((6, 9), (24, 18), {"n_stages": 2}),  # one stage 1x along the columns
    ((3, 4), (24, 32), {"radius": 1, "pad_mode": "replicate", "base_kernel": "delta"}),
    ((5, 5), (40, 40), {"safe_start": False}),  # no gate
    ((5, 5), (40, 40), {"kernel_fixup": False}),  # no correction
]


def _without_filters_op(monkeypatch) -> None:
    monkeypatch.setattr(jbu_module, "has_jbu_stage_filters", lambda device="cpu": False)


def _count_filters_op(monkeypatch) -> list[int]:
    calls: list[int] = []
    op = jbu_module.jbu_stage_filters
    monkeypatch.setattr(jbu_module, "jbu_stage_filters", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("lr_size", "size", "kwargs"), CASES)
def test_stacks_equal_the_kernels_path_and_the_plain_path(monkeypatch, dtype, lr_size, size, kwargs):
    up = randomize_jbu(JBUStack(**kwargs), seed=3, gate=0.7).to(dtype).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, *lr_size, generator=g, dtype=torch.float64).to(dtype)
    image = torch.rand(2, 3, *size, generator=g, dtype=torch.float64).to(dtype)
    calls = _count_filters_op(monkeypatch)
    with torch.inference_mode():
        out = up(x, image)
        sizes = jbu_module.stage_sizes(lr_size, size)
        fused_stages = sum(
            all(b in (a, 2 * a) for a, b in zip(s_in, s_out))
            for s_in, s_out in zip([lr_size, *sizes[:-1]], sizes)
        )
        assert len(calls) == fused_stages > 0
        with monkeypatch.context() as m:
            _without_filters_op(m)
            kernels_path = up(x, image)
        up.fused = False
        plain = up(x, image)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    scale = max(1.0, float(plain.abs().max()))
    torch.testing.assert_close(out, kernels_path, rtol=0, atol=tol * scale)
    if dtype == torch.float64:  # in float32 the plain path's own rounding dominates (test_jbu's tolerances)
        torch.testing.assert_close(out, plain, rtol=0, atol=tol * scale)


def test_gradients_and_autocast_keep_the_kernels_path(monkeypatch):
    up = randomize_jbu(JBUStack(), seed=3, gate=0.7).eval()
    x, image = torch.randn(1, 4, 6, 6, requires_grad=True), torch.rand(1, 3, 96, 96)
    calls = _count_filters_op(monkeypatch)
    up(x, image).sum().backward()  # training: parameters need gradients
    assert calls == [] and x.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        up(x.detach(), image)  # the phases op does not run under autocast, so neither do its filters
    assert calls == []
