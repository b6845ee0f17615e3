"""JBUStack: shapes at any size, eq. 4-6 against independent references, invariants, gradients, files."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from core_toys import (
    PooledPointwise,
    assert_fused_gradients_equal_plain,
    assert_two_runs_equal,
    randomize_jbu,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from featup.core import CheckpointError, JBUStack, ResizeConvUpsampler, create_upsampler
from featup.core.consistency import back_project
from featup.core.guidance import GuidanceEncoder, MirrorConv2d
from featup.core.jbu import neighborhood_dot, neighborhood_sqdist, pool_guidance, stage_sizes

torch.set_num_threads(1)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_jbu(module, seed)


def test_stage_sizes_plans():
    assert stage_sizes((14, 14), (224, 224)) == [(28, 28), (56, 56), (112, 112), (224, 224)]
    assert stage_sizes((16, 16), (224, 224)) == [(32, 32), (64, 64), (128, 128), (224, 224)]
    assert stage_sizes((14, 14), (29, 29)) == [(29, 29)]  # 2.07x: one stage, not 28 then 29
    assert stage_sizes((14, 14), (10, 100)) == [(10, 28), (10, 56), (10, 100)]
    assert stage_sizes((8, 8), (8, 8)) == [(8, 8)]
    assert stage_sizes((9, 9), (3, 4)) == [(3, 4)]


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), out_h=st.integers(1, 900), out_w=st.integers(1, 900))
def test_stage_sizes_properties(h, w, out_h, out_w):
    sizes = stage_sizes((h, w), (out_h, out_w))
    assert sizes[-1] == (out_h, out_w)
    prev = (h, w)
    for size in sizes:
        for d, target in enumerate((out_h, out_w)):
            if target > prev[d]:  # growing: at most 2**1.1 per stage, never beyond the target
                assert prev[d] < size[d] <= min(2**1.1 * prev[d], target) + 1e-9
            else:  # already there (or shrinking): straight to the target
                assert size[d] == target
        prev = size
    assert len(sizes) == max(1, math.ceil(math.log2(max(out_h / h, out_w / w)) - 0.1))


@settings(max_examples=8, deadline=None)
@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    ratio_h=st.floats(0.5, 17.0),
    ratio_w=st.floats(0.5, 17.0),
    channels=st.integers(1, 5),
)
def test_output_shape_any_ratio_odd_nonsquare(h, w, ratio_h, ratio_w, channels):
    up = _randomize(JBUStack(radius=2, key_dim=8))
    out_size = (max(1, round(h * ratio_h)), max(1, round(w * ratio_w)))
    image = torch.rand(2, 3, out_size[0] + 3, out_size[1] + 2)  # image and output sizes differ on purpose
    out = up(torch.randn(2, channels, h, w), image, output_size=out_size)
    assert out.shape == (2, channels, *out_size)
    assert torch.isfinite(out).all()


def test_output_defaults_to_image_size_and_registry():
    up = create_upsampler("jbu", feat_dim=6)
    assert isinstance(up, JBUStack) and not up.training
    out = up(torch.randn(1, 6, 5, 7), torch.rand(1, 3, 81, 111))
    assert out.shape == (1, 6, 81, 111)


def _gaussian_taps(radius: int, sigma: float) -> torch.Tensor:
    c = torch.linspace(-1, 1, 2 * radius + 1, dtype=torch.float64)
    k = torch.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def _spatial_smoothing(
    x: torch.Tensor, size: tuple[int, int], radius: int, taps: torch.Tensor, mode: str
) -> torch.Tensor:
    """Reference: resize, reflect pad, depthwise convolution with one K x K filter."""
    x = F.interpolate(x, size=size, mode=mode, align_corners=False)
    x = F.pad(x, [radius] * 4, mode="reflect")
    k = taps.to(x.dtype)
    c = x.shape[1]
    return F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("out_size", [(22, 18), (44, 36), (37, 29)])
def test_constant_guidance_reduces_to_spatial_smoothing(out_size, mode):
    # eq. 4-6 alone (no kernel correction): the spatial Gaussian of each stage
    up = _randomize(JBUStack(radius=2, key_dim=8, n_stages=2, resize_mode=mode, kernel_fixup=False), seed=3)
    up = up.double()
    sigmas = [s.sigma_spatial.item() for s in up.stages]
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    image = torch.full((2, 3, *out_size), 0.37, dtype=torch.float64)  # constant: every range logit is equal
    expected = x
    for k, size in enumerate(stage_sizes(x.shape[-2:], out_size)):
        expected = _spatial_smoothing(expected, size, 2, _gaussian_taps(2, sigmas[min(k, 1)]), mode)
    torch.testing.assert_close(up(x, image), back_project(expected, x))  # then the consistency step


def test_constant_guidance_with_kernel_correction_is_one_fixed_filter_per_stage():
    """The correction is a function of the kernel and the guidance, so a constant image still gives one
    spatially invariant filter per stage (mirror-symmetric, summing to 1), no longer the bare Gaussian."""
    up = _randomize(JBUStack(radius=2, key_dim=8, n_stages=2), seed=3).double()
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    image = torch.full((2, 3, 37, 29), 0.37, dtype=torch.float64)
    guidance = up.guidance(image)
    expected = x
    for k, size in enumerate(stage_sizes(x.shape[-2:], (37, 29))):
        stage = up.stages[min(k, 1)]
        kernel = stage.kernel(pool_guidance(guidance, size), pool_guidance(image, size))[0]
        taps = kernel[:, size[0] // 2, size[1] // 2].view(5, 5)
        torch.testing.assert_close(kernel, taps.reshape(25, 1, 1).expand_as(kernel))
        torch.testing.assert_close(taps, taps.flip(1))
        torch.testing.assert_close(taps.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert not torch.allclose(taps, _gaussian_taps(2, stage.sigma_spatial.item()))
        expected = _spatial_smoothing(expected, size, 2, taps, "bicubic")
    torch.testing.assert_close(up(x, image), back_project(expected, x))


@pytest.mark.parametrize("kernel_fixup", [False, True])
def test_kernels_sum_to_one_and_constants_are_preserved(kernel_fixup):
    up = _randomize(JBUStack(radius=3, key_dim=8, kernel_fixup=kernel_fixup), seed=1)
    image = torch.rand(1, 3, 40, 56)
    kernel = up.up1.kernel(up.guidance(image), image)
    assert kernel.shape == (1, 49, 40, 56)
    torch.testing.assert_close(kernel.sum(1), torch.ones(1, 40, 56))
    # eq. 6 is a weighted average; the correction may add negative taps (sharpening), still summing to 1
    assert (kernel >= 0).all() != kernel_fixup
    const = torch.full((1, 3, 5, 7), 2.5)
    torch.testing.assert_close(up(const, image), torch.full((1, 3, 40, 56), 2.5))
    shrunk = up(const, image, output_size=(3, 4))
    torch.testing.assert_close(shrunk, torch.full((1, 3, 3, 4), 2.5))


def test_linear_in_features_when_encoder_agnostic():
    up = _randomize(JBUStack(key_dim=8), seed=2)
    image = torch.rand(1, 3, 45, 31)
    a, b = torch.randn(1, 7, 6, 4), torch.randn(1, 7, 6, 4)
    torch.testing.assert_close(
        up(2 * a - 3 * b, image), 2 * up(a, image) - 3 * up(b, image), atol=1e-5, rtol=1e-5
    )
    assert not any("fixup_proj" in n and not n.startswith("up") for n, _ in up.named_parameters())


@pytest.mark.parametrize("range_kernel", ["dot", "distance"])
def test_range_kernel_follows_the_guidance_edge(range_kernel):
    """With a sharp learned range kernel, output pixels take features from their own side of an image edge."""
    up = JBUStack(
        radius=3,
        key_dim=3,
        n_stages=1,
        resize_mode="bilinear",
        init_sigma_spatial=1.0,
        range_kernel=range_kernel,
        guidance_encoder=False,
        kernel_fixup=False,
        safe_start=False,
        consistency=False,  # the low-res edge (column 8) is not where the image's is (9): it would move it
    ).eval()
    with torch.no_grad():
        up.up1.range_proj[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        up.up1.range_proj[0].bias.zero_()
        # keys = +-1 per channel (GELU(1) = 0.8413): black and white pixels get opposite keys
        up.up1.range_proj[3].weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 2 / F.gelu(torch.tensor(1.0)))
        up.up1.range_proj[3].bias.fill_(-1.0)
        up.up1.range_temp.fill_(math.log(50.0))
    image = torch.zeros(1, 3, 16, 16)
    image[..., 9:] = 1.0  # edge between columns 8 and 9 (not on the low-res grid)
    # tap (i, j) at pixel (y, x) reads pixel (y + i - 3, x + j - 3)
    kernel = up.up1.kernel(image)[0].view(7, 7, 16, 16)
    for x in range(16):
        cols = torch.arange(7) + x - 3
        other_side = (cols >= 9) != (x >= 9)
        other_side &= (cols >= 0) & (cols < 16)  # reflect padding: inside columns only
        assert kernel[:, other_side, 5, x].sum() < 1e-2, x  # eq. 6: almost no weight across the edge
    feats = torch.zeros(1, 1, 8, 8)
    feats[..., 4:] = 1.0  # low-res edge at column 4 = hr column 8
    sharp = up(feats, image)[0, 0]
    blurry = F.interpolate(feats, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    target = image[0, 0]
    assert (sharp - target).abs().mean() < 0.85 * (blurry - target).abs().mean()


@pytest.mark.parametrize("kernel_fixup", [True, False])
def test_horizontal_flip_equivariance(kernel_fixup):
    up = _randomize(JBUStack(feat_dim=5, key_dim=8, kernel_fixup=kernel_fixup), seed=4)
    x, image = torch.randn(2, 5, 7, 9), torch.rand(2, 3, 61, 75)
    out = up(x, image)
    flipped = up(x.flip(-1), image.flip(-1))
    torch.testing.assert_close(flipped, out.flip(-1), atol=1e-5, rtol=1e-5)


def test_unmirrored_kernel_correction_breaks_flip_equivariance():
    # the original's correction (a 1x1 conv over the taps) is not equivariant; the mirror average is what makes
    # the default stack so
    up = _randomize(JBUStack(feat_dim=5, key_dim=8, constrained_fixup=False), seed=4)
    x, image = torch.randn(2, 5, 7, 9), torch.rand(2, 3, 61, 75)
    assert not torch.allclose(up(x.flip(-1), image.flip(-1)), up(x, image).flip(-1), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs", [{}, {"feat_dim": 4, "kernel_fixup": True}, {"feat_dim": 4, "original": True}]
)
def test_gradients_reach_every_parameter(kwargs):
    # float64 and seeded inputs: with these random weights the last stage's gate and temperature get true
    # gradients of ~1e-14 (in the plain path too), which float32 or an unlucky input may round to exactly 0
    g = torch.Generator().manual_seed(5)
    up = _randomize(JBUStack(**kwargs), seed=5).double()
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    image = torch.rand(2, 3, 64, 48, dtype=torch.float64, generator=g).requires_grad_(True)  # 16x: 4 stages
    out = up(x, image)
    (out * torch.randn(out.shape, dtype=out.dtype, generator=g)).sum().backward()  # seeded: see above
    for name, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


def test_gradcheck_float64():
    up = _randomize(JBUStack(feat_dim=2, radius=1, key_dim=4, n_stages=2, kernel_fixup=True), seed=6).double()
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, i: up(f, i, output_size=(11, 8)), (x, image))
    names = ["up1.range_temp", "up2.sigma_spatial", "up1.range_proj.0.weight", "fixup_proj.1.weight"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in up.named_parameters() if n in names}
    x0, i0 = x.detach(), image.detach()

    def f(*values):
        return torch.func.functional_call(up, dict(zip(params, values)), (x0, i0, (11, 8)))

    assert torch.autograd.gradcheck(f, tuple(params.values()))


def test_gradcheck_float64_guidance_encoder():
    up = _randomize(JBUStack(radius=1, key_dim=3, n_stages=2), seed=8).double()
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    image = torch.rand(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, i: up(f, i, output_size=(11, 8)), (x, image))
    names = ["encoder.0.weight", "encoder.2.weight", "up1.range_temp", "up2.sigma_spatial"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in up.named_parameters() if n in names}
    assert len(params) == len(names)
    x0, i0 = x.detach(), image.detach()

    def f(*values):
        return torch.func.functional_call(up, dict(zip(params, values)), (x0, i0, (11, 8)))

    assert torch.autograd.gradcheck(f, tuple(params.values()))


def test_mirror_conv_and_encoder_commute_with_horizontal_flips():
    torch.manual_seed(0)
    conv, enc = MirrorConv2d(3, 5), GuidanceEncoder(3, 6)
    for size in [(9, 11), (2, 7)]:  # (2, 7): too small to reflect vertically, replicates instead
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(conv(x.flip(-1)), conv(x).flip(-1))
        torch.testing.assert_close(enc(x.flip(-1)), enc(x).flip(-1), atol=1e-6, rtol=1e-5)
        assert enc(x).shape == (2, 6, *size)
    with pytest.raises(ValueError, match="odd kernel_size"):
        MirrorConv2d(3, 5, 4)
    with pytest.raises(ValueError, match="positive int"):
        GuidanceEncoder(3, 0)


def test_paper_form_configs_saved_before_the_new_options_still_load(tmp_path):
    up = _randomize(JBUStack(key_dim=8, range_kernel="dot", guidance_encoder=False), seed=9)
    path = up.save(tmp_path / "old")
    config_file = tmp_path / "old.json"
    cfg = json.loads(config_file.read_text())
    for key in ("range_kernel", "guidance_encoder"):
        del cfg["kwargs"][key]  # as written by a release without these options
    config_file.write_text(json.dumps(cfg))
    loaded = JBUStack.load(path)
    assert loaded.encoder is None and loaded.range_kernel == "dot"
    x, image = torch.randn(1, 3, 5, 6), torch.rand(1, 3, 33, 41)
    torch.testing.assert_close(loaded(x, image), up(x, image))


def test_neighborhood_helpers_match_unfold():
    q = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    qp = F.pad(q, [2] * 4, mode="reflect")
    patches = F.unfold(qp, 5).view(2, 5, 25, 6, 7)
    torch.testing.assert_close(neighborhood_dot(q, 2), torch.einsum("bcphw,bchw->bphw", patches, q))
    torch.testing.assert_close(neighborhood_sqdist(q, 2), (patches - q[:, :, None]).square().sum(1))


def test_save_load_round_trip(tmp_path):
    up = _randomize(JBUStack(feat_dim=3, key_dim=8, radius=2, resize_mode="bicubic"), seed=7)
    path = up.save(tmp_path / "jbu", extra={"backbone": "toy"})
    loaded = JBUStack.load(path)
    assert not loaded.training and loaded.config() == up.config()
    x, image = torch.randn(1, 3, 5, 6), torch.rand(1, 3, 33, 41)
    torch.testing.assert_close(loaded(x, image), up(x, image))
    assert (tmp_path / "jbu.json").is_file()


def test_corrupted_and_mismatched_checkpoints(tmp_path):
    up = JBUStack(feat_dim=3)
    path = up.save(tmp_path / "jbu")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        JBUStack.load(path)
    other = ResizeConvUpsampler(feat_dim=3).save(tmp_path / "rc")
    with pytest.raises(CheckpointError, match="JBUStack"):
        JBUStack.load(other)
    with pytest.raises(CheckpointError):
        JBUStack.load(tmp_path / "missing")


def test_bad_inputs_raise_clear_errors():
    up = JBUStack(feat_dim=4)
    with pytest.raises(ValueError, match="4 channels"):
        up(torch.randn(1, 5, 3, 3), torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match="image"):
        up(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(B,C,h,w\)"):
        up(torch.randn(4, 3, 3), torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match="feat_dim"):
        JBUStack(original=True)
    with pytest.raises(ValueError, match="radius=3"):
        JBUStack(8, original=True, radius=2)
    with pytest.raises(ValueError, match="resize_mode"):
        JBUStack(resize_mode="area")
    with pytest.raises(ValueError, match="range_kernel"):
        JBUStack(range_kernel="cosine")


def test_neighborhood_helpers_gradcheck_and_match_shifted_views():
    """The fused-op similarities against a tap-by-tap computation on shifted views, and their gradients."""
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    qp = F.pad(q, [1] * 4, mode="replicate")
    shifted = torch.stack([qp[:, :, i : i + 5, j : j + 4] for i in range(3) for j in range(3)], dim=2)
    torch.testing.assert_close(neighborhood_dot(q, 1, "replicate"), (shifted * q[:, :, None]).sum(1))
    torch.testing.assert_close(
        neighborhood_sqdist(q, 1, "replicate"), (shifted - q[:, :, None]).square().sum(1)
    )
    assert torch.autograd.gradcheck(lambda x: neighborhood_dot(x, 1), (q,))
    assert torch.autograd.gradcheck(lambda x: neighborhood_sqdist(x + 0.5, 2), (q,))


# ----------------------------------------------------------------------------------------------------------
# safe start: a fresh stack is the chain of its stages' resizes; training moves it away


def _resize_chain(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Reference: the plain 2x resizes of the stack's stage plan, with torch's own interpolation."""
    for stage_size in stage_sizes(x.shape[-2:], size):
        shrinking = stage_size[0] < x.shape[-2] or stage_size[1] < x.shape[-1]
        x = F.interpolate(x, size=stage_size, mode=mode, align_corners=False, antialias=shrinking)
    return x


def _photo_like(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth shading, hard region edges and sensor noise: a stand-in for a photograph."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    shade = 0.5 + 0.3 * torch.sin(3 * xx + 2 * yy)
    edge = ((xx * 0.7 - yy * 0.4) > 0.1).float()
    base = torch.rand(n, 3, 1, 1, generator=g) * shade + 0.4 * edge * torch.rand(n, 3, 1, 1, generator=g)
    return (base + 0.03 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)


_SIZES = [
    ((14, 14), (224, 224), None),
    ((7, 5), (109, 83), None),
    ((9, 12), (37, 200), 6),
    ((8, 8), (5, 3), 6),
]


@pytest.mark.parametrize(("lr_size", "out_size", "feat_dim"), _SIZES)
def test_fresh_stack_is_kopfs_jbu_made_consistent(lr_size, out_size, feat_dim):
    """The default safe start: Kopf's joint bilateral upsampling (the jbu_classic baseline), back-projected."""
    torch.manual_seed(0)
    up, classic = JBUStack(feat_dim).eval(), create_upsampler("jbu_classic")
    channels = feat_dim or 5
    for x, image in [
        (torch.randn(2, channels, *lr_size), torch.rand(2, 3, *out_size)),  # random
        (3 * torch.randn(2, channels, *lr_size), _photo_like(2, *out_size, seed=1)),  # photo-like guidance
    ]:
        expected = classic(x, image)
        if out_size[0] >= lr_size[0] and out_size[1] >= lr_size[1]:
            expected = back_project(expected, x)
        for fused in (True, False):
            up.fused = fused
            torch.testing.assert_close(up(x, image), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("lr_size", "out_size", "feat_dim"), _SIZES)
def test_fresh_delta_stack_is_the_chain_of_its_stage_resizes(lr_size, out_size, feat_dim, mode):
    torch.manual_seed(0)
    up = JBUStack(feat_dim, resize_mode=mode, base_kernel="delta").eval()
    channels = feat_dim or 5
    for x, image in [
        (torch.randn(2, channels, *lr_size), torch.rand(2, 3, *out_size)),  # random
        (3 * torch.randn(2, channels, *lr_size), _photo_like(2, *out_size, seed=1)),  # photo-like guidance
    ]:
        out = up(x, image)
        expected = _resize_chain(x, out_size, mode)
        if out_size[0] >= lr_size[0] and out_size[1] >= lr_size[1]:
            expected = back_project(expected, x)  # then the consistency step (not for a downsampling)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert create_upsampler("jbu").config() == JBUStack().config() and JBUStack().safe_start


def test_paper_form_is_not_the_safe_start():
    # the check above is not vacuous: without the safe start the same fresh stack blurs
    torch.manual_seed(0)
    x, image = torch.randn(1, 5, 7, 5), _photo_like(1, 109, 83, seed=1)
    for up in (JBUStack(safe_start=False), create_upsampler("jbu_paper")):
        assert (up(x, image) - _resize_chain(x, (109, 83), "bicubic")).abs().max() > 0.1


@pytest.mark.parametrize(
    "kwargs", [{}, {"feat_dim": 4}, {"kernel_fixup": False}, {"constrained_fixup": False}]
)
def test_safe_start_gets_gradients_at_initialisation(kwargs):
    """The gates (and the corrections' zero-initialised output layers) get gradients at step 0."""
    torch.manual_seed(0)
    up = JBUStack(**kwargs).train()
    up.eval()  # no dropout: the gradient is deterministic
    x = torch.randn(2, 4, 4, 3)
    image = _photo_like(2, 64, 48, seed=2)
    out = up(x, image)
    (out * torch.randn_like(out)).sum().backward()
    grads = {n: p.grad for n, p in up.named_parameters()}
    must = [f"up{k}.gate" for k in range(1, 5)]
    if up.up1.fixup_proj is not None:
        must += [f"up{k}.fixup_proj.3.weight" for k in range(1, 5)]
    if up.fixup_proj is not None:
        must += ["fixup_proj.1.weight", "fixup_proj.1.bias"]
    for name in must:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("base_kernel", ["delta", "classic"])
def test_gate_interpolates_between_the_base_and_the_bilateral_kernel(base_kernel):
    paper = _randomize(JBUStack(key_dim=8, radius=2, kernel_fixup=False, safe_start=False), seed=3)
    gated = JBUStack(key_dim=8, radius=2, kernel_fixup=False, base_kernel=base_kernel).eval()
    gated.load_state_dict({**paper.state_dict(), **{f"up{k}.gate": torch.tensor(1.0) for k in range(1, 5)}})
    image = _photo_like(1, 20, 26, seed=4)
    guidance = gated.guidance(image)
    for kernel in (gated.up1.kernel, gated.up1.kernel_plain):
        torch.testing.assert_close(kernel(guidance, image), paper.up1.kernel(guidance))
    with torch.no_grad():
        gated.up1.gate.fill_(0.3)
    if base_kernel == "delta":
        base = torch.zeros(1, 25, 1, 1)
        base[:, 12] = 1.0
    else:  # Kopf's JBU: the jbu_classic baseline's kernel
        base = create_upsampler("jbu_classic", radius=2).kernel(image)
    expected = 0.3 * paper.up1.kernel(guidance) + 0.7 * base
    for kernel in (gated.up1.kernel, gated.up1.kernel_plain):
        torch.testing.assert_close(kernel(guidance, image), expected)
    with (
        pytest.raises(ValueError, match="needs the image")
        if base_kernel == "classic"
        else contextlib.nullcontext()
    ):
        gated.up1.kernel(guidance)


def test_gradcheck_float64_gate_between_zero_and_one():
    up = _randomize(JBUStack(feat_dim=2, radius=1, key_dim=4, n_stages=2), seed=6).double()
    with torch.no_grad():
        up.up1.gate.fill_(0.4)
        up.up2.gate.fill_(-0.2)
    x0 = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    i0 = torch.rand(1, 3, 6, 5, dtype=torch.float64)
    names = ["up1.gate", "up2.gate", "up1.range_temp", "up1.fixup_proj.3.weight"]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in up.named_parameters() if n in names}
    assert len(params) == len(names)

    def f(*values):
        return torch.func.functional_call(up, dict(zip(params, values)), (x0, i0, (11, 8)))

    assert torch.autograd.gradcheck(f, tuple(params.values()))


def _regions(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = torch.empty(n, 3, size, size)
    for i in range(n):
        a, b = (torch.rand(2, generator=g) * 2 * math.pi).tolist()
        o1, o2 = (torch.rand(2, generator=g) - 0.5).tolist()
        code = (math.cos(a) * xx + math.sin(a) * yy > o1).long() * 2 + (
            math.cos(b) * xx + math.sin(b) * yy > o2
        )
        imgs[i] = torch.rand(4, 3, generator=g)[code].permute(2, 0, 1)
    return imgs


def _view_loss(up: torch.nn.Module, backbone: PooledPointwise, images: torch.Tensor) -> float:
    """The multi-view objective on fixed views: every sub-stride shift of a crop, its features against the
    4x4 box average (the toy backbone's true downsampler) of the same crop of the upsampled map."""
    with torch.no_grad():
        hr = up(backbone(images), images)
        size = images.shape[-1] - 4
        errs = [
            (
                backbone(images[..., i : i + size, j : j + size])
                - F.avg_pool2d(hr[..., i : i + size, j : j + size], 4)
            )
            .square()
            .mean()
            for i in range(4)
            for j in range(4)
        ]
    return float(torch.stack(errs).mean())


def _against_the_start(
    up: torch.nn.Module, backbone: PooledPointwise, images: torch.Tensor
) -> tuple[float, float, float, float]:
    """(MSE to the ideal features, the same for a fresh ``JBUStack()``, held-out view loss, the same fresh)."""
    start = JBUStack().eval()
    with torch.no_grad():
        lr, truth = backbone(images), backbone.hr_features(images)
        err_trained = float((up(lr, images) - truth).square().mean())
        err_start = float((start(lr, images) - truth).square().mean())
    return err_trained, err_start, _view_loss(up, backbone, images), _view_loss(start, backbone, images)


def test_short_training_moves_away_from_the_safe_start_and_improves_it():
    from featup.core.training import train_jbu

    backbone = PooledPointwise()
    train, held_out = _regions(8, 32, seed=1), _regions(6, 32, seed=2)
    up = train_jbu(
        backbone,
        train,
        steps=40,
        batch_size=4,
        kernel_size=4,
        lr=1e-2,
        uncertainty=False,
        progress=False,
        seed=0,
    )
    assert all(abs(s.gate.item()) > 1e-3 for s in up.stages[:2])  # 8 -> 32 px: two stages
    err_trained, err_start, views_trained, views_start = _against_the_start(up, backbone, held_out)
    print(
        f"held-out views {views_trained:.3e} vs start {views_start:.3e}; MSE {err_trained:.5f} vs {err_start:.5f}"
    )
    # training seeds 0 / 1 / 2 (Kopf start, back-projected): views 0.58 / 0.52 / 0.58 of the start's,
    # MSE 0.40 / 0.38 / 0.43
    assert views_trained < 0.75 * views_start
    assert err_trained < 0.6 * err_start


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_100_steps_of_the_default_preset_improve_on_the_safe_start(seed):
    """``train_jbu`` with its defaults (only the downsampler kernel set to the toy backbone's stride)."""
    from featup.core.training import train_jbu

    backbone = PooledPointwise()
    train, held_out = _regions(8, 32, seed=1), _regions(6, 32, seed=2)
    up = train_jbu(backbone, train, steps=100, kernel_size=4, progress=False, seed=seed)
    err_trained, err_start, views_trained, views_start = _against_the_start(up, backbone, held_out)
    # measured for seeds 0 / 1 / 2: MSE 0.46 / 0.53 / 0.53 of the start's, held-out views 0.65 / 0.79 / 0.79
    assert err_trained < 0.7 * err_start
    assert views_trained < 0.9 * views_start


def test_configs_saved_before_the_safe_start_load_as_saved(tmp_path):
    # a stack saved by the release before ``safe_start`` (every other option present)
    up = _randomize(JBUStack(key_dim=8, safe_start=False), seed=10)
    path = up.save(tmp_path / "pre")
    cfg = json.loads((tmp_path / "pre.json").read_text())
    assert cfg["kwargs"].pop("safe_start") is False
    (tmp_path / "pre.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"format": "featup-checkpoint/1", "config": json.dumps(cfg)})
    loaded = JBUStack.load(path)
    assert not loaded.safe_start and loaded.up1.gate is None
    x, image = torch.randn(1, 3, 5, 6), torch.rand(1, 3, 33, 41)
    torch.testing.assert_close(loaded(x, image), up(x, image), atol=0, rtol=0)
    # and one saved now round-trips with its gates
    fresh = _randomize(JBUStack(key_dim=8), seed=11)
    again = JBUStack.load(fresh.save(tmp_path / "now"))
    assert again.safe_start and torch.equal(again.up2.gate, fresh.up2.gate)


def test_registry_names_the_variants():
    paper = create_upsampler("jbu_paper")
    assert (paper.range_kernel, paper.encoder, paper.kernel_fixup, paper.safe_start) == (
        "dot",
        None,
        False,
        False,
    )
    assert create_upsampler("jbu_paper", radius=2).radius == 2  # the real hyperparameters stay flags
    original = create_upsampler("jbu_original", feat_dim=6)
    assert original.config() == JBUStack(6, original=True).config()
    assert original.state_dict().keys() == JBUStack(6, original=True).state_dict().keys()
    assert not any(k.endswith("gate") for k in original.state_dict())
    with pytest.raises(ValueError, match="feat_dim"):
        create_upsampler("jbu_original")


# ----------------------------------------------------------------------------------------------------------
# the fused forward against the plain path (the oracle)

FUSED_CASES = [
    ((14, 14), (224, 224)),  # four exact 2x stages
    ((7, 5), (109, 83)),  # odd, non-square, a last stage that is not 2x
    ((9, 12), (37, 200)),  # different ratios per dimension
    ((3, 2), (6, 4)),  # windows wider than the map
    ((14, 10), (20, 80)),  # a plain-path stage (14 -> 20) feeding fused ones through a zero-margined buffer
    ((8, 8), (5, 3)),  # shrinking: the plain path
]
FUSED_CONFIGS = [
    {},
    {"feat_dim": 5},
    {"constrained_fixup": False},
    {"kernel_fixup": False, "resize_mode": "bilinear", "radius": 2},
    {"range_kernel": "dot", "guidance_encoder": False, "kernel_fixup": False, "safe_start": False},
    {"feat_dim": 5, "original": True},
    {"pad_mode": "replicate", "radius": 1},
]


def _both_paths(up: JBUStack, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    up.fused = False
    plain = up(x, image)
    up.fused = True
    return plain, up(x, image)


@pytest.mark.parametrize("kwargs", FUSED_CONFIGS)
def test_fused_forward_equals_the_plain_path(kwargs):
    up = _randomize(JBUStack(**kwargs), seed=12)
    for m in up.stages:
        if m.gate is not None:
            with torch.no_grad():
                m.gate.fill_(0.7)
    for lr_size, out_size in FUSED_CASES:
        x, image = torch.randn(2, 5, *lr_size), _photo_like(2, *out_size, seed=3)
        with torch.no_grad():
            plain, fused = _both_paths(up, x, image)  # float32
            up64 = up.double()
            plain64, fused64 = _both_paths(up64, x.double(), image.double())
            up.float()
        torch.testing.assert_close(fused64, plain64, rtol=1e-10, atol=1e-10)
        # float32: no further from the float64 result than the plain path is (only the rounding differs)
        scale = plain64.abs().max()
        assert (fused.double() - plain64).abs().max() <= 2 * (
            plain.double() - plain64
        ).abs().max() + 1e-6 * scale


def test_fused_gradients_and_dropout_masks_equal_the_plain_path():
    up = _randomize(JBUStack(feat_dim=3, radius=2, key_dim=6), seed=13).double().train()
    for m in up.stages:
        with torch.no_grad():
            m.gate.fill_(0.6)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    image = _photo_like(2, 40, 29, seed=5).double()
    grads = assert_fused_gradients_equal_plain(up, x, image, lambda *_: torch.manual_seed(0))  # same dropout
    assert len(grads) > 20  # up4 is unused at 8x


def test_fused_path_runs_inside_inference_mode_and_then_with_autograd():
    up = _randomize(JBUStack(key_dim=8), seed=14)
    x, image = torch.randn(1, 4, 6, 6), torch.rand(1, 3, 48, 48)
    with torch.inference_mode():
        first = up(x, image)
    x.requires_grad_(True)
    out = up(x, image)  # cached resampling plans made in inference mode must not break autograd
    out.sum().backward()
    torch.testing.assert_close(out.detach(), first)
    assert x.grad is not None


def test_fused_phases_op_equals_one_adaptive_conv_per_phase(monkeypatch):
    """The fused stage with featup.kernels' phases op (one pass, no interleave copy) against the same stage
    with one adaptive convolution per output phase: outputs and all gradients to float rounding."""
    import featup.core.jbu as jbu_module

    if not jbu_module.has_adaptive_conv_phases("cpu"):
        pytest.skip("this featup-kernels build predates adaptive_conv_phases")
    up = _randomize(JBUStack(feat_dim=3, radius=2, key_dim=6), seed=15).double().train()
    for m in up.stages:
        with torch.no_grad():
            m.gate.fill_(0.6)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    image = _photo_like(2, 40, 29, seed=6).double()

    def configure(run: int, *_: torch.Tensor) -> None:  # run 0: the phases op, run 1: one conv per phase
        monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases", lambda device, _u=run == 0: _u)
        torch.manual_seed(0)

    assert len(assert_two_runs_equal(up, x, image, configure)) > 20
    # float32 at 16x: the same values to float32 rounding
    up = _randomize(JBUStack(), seed=16).eval()
    x, image = torch.randn(1, 8, 7, 7), _photo_like(1, 112, 112, seed=7)
    outs = []
    for use_op in (True, False):
        monkeypatch.setattr(jbu_module, "has_adaptive_conv_phases", lambda device, _u=use_op: _u)
        with torch.no_grad():
            outs.append(up(x, image))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
