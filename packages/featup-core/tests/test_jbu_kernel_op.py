"""JBUStage.kernel through the compiled featup.kernels.jbu_stage_kernel (the inference path) against the torch
ops (kernel_op=False) and the plain path (the oracle): fresh and randomised stacks, odd and non-square sizes,
batch > 1, float32 (to float rounding) and float64; the op stays off whenever a gradient is needed, and a
build without it falls back to the torch ops."""

from __future__ import annotations

import pytest
import torch
from core_toys import assert_fused_gradients_equal_plain, randomize_jbu

import featup.core.jbu as jbu_module
from featup.core import JBUStack
from featup.core.jbu import JBUStage

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    not jbu_module.has_jbu_stage_kernel("cpu"), reason="this featup-kernels build predates jbu_stage_kernel"
)


def _randomize(module: torch.nn.Module, seed: int, gate: float = 0.7) -> torch.nn.Module:
    return randomize_jbu(module, seed, gate)


def _photo_like(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth colour regions with an edge (range kernels far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 5, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    img[..., : h // 2, :] = img[..., : h // 2, :].flip(1)
    return img.clamp(0, 1)


CASES = [((14, 14), (224, 224), 1), ((7, 5), (109, 83), 2), ((9, 12), (37, 200), 1), ((3, 2), (6, 4), 2)]
CONFIGS = [
    {},
    {"feat_dim": 5},
    {"base_kernel": "delta"},
    {"kernel_fixup": False, "radius": 2},
    {"safe_start": False},
    {"pad_mode": "replicate", "radius": 1},
]


def _three_paths(up: JBUStack, x: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
    """(the op, the torch ops of the fused path, the plain path) under no_grad."""
    outs = []
    for fused, op in ((True, True), (True, False), (False, False)):
        up.fused = fused
        for stage in up.stages:
            stage.kernel_op = op
        with torch.no_grad():
            outs.append(up(x, image))
    up.fused = True
    for stage in up.stages:
        stage.kernel_op = True
    return outs


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_with_the_op_equals_the_torch_paths(kwargs, fresh):
    up = JBUStack(**kwargs).eval()
    if not fresh:
        _randomize(up, seed=21)
    for k, (lr_size, out_size, batch) in enumerate(CASES):
        x, image = torch.randn(batch, 5, *lr_size), _photo_like(batch, *out_size, seed=k)
        op, torch_ops, plain = _three_paths(up, x, image)
        op64, torch64, plain64 = _three_paths(up.double(), x.double(), image.double())
        up.float()
        torch.testing.assert_close(op64, plain64, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op64, torch64, rtol=1e-10, atol=1e-10)
        # float32: no further from the float64 result than the torch paths are (only the rounding differs)
        scale = plain64.abs().max()
        worst = max((p.double() - plain64).abs().max() for p in (torch_ops, plain))
        assert (op.double() - plain64).abs().max() <= 2 * worst + 1e-6 * scale


def test_the_op_runs_on_the_inference_path_only(monkeypatch):
    calls = []

    def spy(real):
        def call(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        return call

    # the kernels op, or the same pass writing composite filters (jbu_stage_filters) for 1x / 2x stages
    monkeypatch.setattr(jbu_module, "jbu_stage_kernel", spy(jbu_module.jbu_stage_kernel))
    if jbu_module.jbu_stage_filters is not None:
        monkeypatch.setattr(jbu_module, "jbu_stage_filters", spy(jbu_module.jbu_stage_filters))
    up = _randomize(JBUStack(), seed=22)
    # sizes no other test uses: consistency._lift caches its matrices, and one made in inference mode cannot
    # be used by autograd later (a known issue of consistency.py, outside this test's subject)
    x, image = torch.randn(2, 4, 6, 5), _photo_like(2, 47, 41, seed=1)
    with torch.inference_mode():
        up(x, image)
    assert len(calls) == 3  # one per stage (8x: three stages)
    with torch.no_grad():
        up(x, image)
    assert len(calls) == 6
    calls.clear()
    up(x, image).sum().backward()  # parameters need gradients: the torch ops
    assert not calls
    up.train()
    with torch.no_grad():  # dropout active: the torch ops (the op draws no masks)
        up(x, image)
    assert not calls


def test_gradients_are_those_of_the_torch_ops():
    """With autograd on, the op is not used: the gradients equal the plain path's."""
    up = _randomize(JBUStack(feat_dim=3, radius=2, key_dim=6), seed=23).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    image = _photo_like(2, 40, 29, seed=2).double()

    def op_not_used(_x: torch.Tensor, image: torch.Tensor) -> None:
        assert not up.up1.kernel_op_applies(up.guidance(image)[:, :, :10, :8])

    assert_fused_gradients_equal_plain(up, x, image, op_not_used)


@pytest.mark.parametrize("base_kernel", ["classic", "delta"])
def test_stage_kernel_equals_kernel_plain(base_kernel):
    stage = _randomize(JBUStage(3, 8, 8, safe_start=True, base_kernel=base_kernel, kernel_fixup=True,
                                constrained_fixup=True), seed=24, gate=0.4).double()  # fmt: skip
    guidance = torch.randn(2, 8, 11, 17, dtype=torch.float64)
    image = _photo_like(2, 11, 17, seed=3).double()
    with torch.no_grad():
        assert stage.kernel_op_applies(guidance)
        op = stage.kernel(guidance, image)
        plain = stage.kernel_plain(guidance, image)
    assert op.shape == plain.shape == (2, 49, 11, 17)
    torch.testing.assert_close(op, plain, rtol=1e-10, atol=1e-12)


def test_other_layouts_and_dtypes_take_the_torch_ops():
    g = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert not JBUStage(2, 8, 8, range_kernel="dot").eval().kernel_op_applies(g)
        assert (
            not JBUStage(2, 8, 8, kernel_fixup=True).eval().kernel_op_applies(g)
        )  # unconstrained correction
        assert JBUStage(2, 8, 8, kernel_fixup=True, constrained_fixup=True).eval().kernel_op_applies(g)
        assert not JBUStage(2, 8, 8).eval().kernel_op_applies(g.double())  # float32 parameters
        assert not JBUStage(2, 8, 8).eval().kernel_op_applies(g.bfloat16())


def test_a_build_without_the_op_falls_back(monkeypatch):
    up = _randomize(JBUStack(), seed=25)
    x, image = torch.randn(1, 4, 7, 7), _photo_like(1, 112, 112, seed=4)
    with torch.no_grad():
        with_op = up(x, image)
        for stage in up.stages:
            stage.kernel_op = False
        torch_ops = up(x, image)
        for stage in up.stages:
            stage.kernel_op = True
        monkeypatch.setattr(jbu_module, "has_jbu_stage_kernel", lambda device="cpu": False)
        monkeypatch.setattr(jbu_module, "jbu_stage_kernel", None)
        fallback = up(x, image)
    assert torch.equal(fallback, torch_ops)  # the torch ops, exactly
    assert not torch.equal(with_op, torch_ops)  # (the op did run before: other rounding)


def test_checkpoints_load_and_the_flag_is_not_saved(tmp_path):
    up = _randomize(JBUStack(), seed=26)
    path = tmp_path / "jbu.safetensors"
    up.save(path)
    loaded = JBUStack.load(path).eval()
    assert all(stage.kernel_op for stage in loaded.stages)
    assert "kernel_op" not in loaded.config()
    x, image = torch.randn(1, 4, 7, 7), _photo_like(1, 56, 56, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, image), up(x, image), rtol=0, atol=0)
