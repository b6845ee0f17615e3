"""JBUStack's named variants: the old layout flags still build the same module (with a DeprecationWarning that
names the variant to use), and configs saved with the flags load to identical outputs without a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from featup.core import create_upsampler
from featup.core.checkpoint import save_checkpoint
from featup.core.jbu import VARIANTS, JBUStack

torch.set_num_threads(1)

SMALL = dict(key_dim=8, radius=2, n_stages=2)

# (old constructor flags, the variant= that builds the same stack, the safe_start it then needs)
OLD_TO_NEW = [
    ({"range_kernel": "distance", "guidance_encoder": True, "kernel_fixup": True}, "default", None),
    (
        {"range_kernel": "dot", "guidance_encoder": False, "kernel_fixup": False, "safe_start": False},
        "paper",
        None,
    ),
    ({"range_kernel": "dot", "guidance_encoder": False, "kernel_fixup": False}, "paper", True),
    ({"original": True, "feat_dim": 6, "key_dim": 32, "radius": 3, "n_stages": 4}, "original", None),
    ({"kernel_fixup": False}, {"kernel_fixup": False}, None),
    ({"constrained_fixup": False, "feat_dim": 5}, {"constrained_fixup": False}, None),
    (
        {"range_kernel": "dot", "guidance_encoder": False},
        {"range_kernel": "dot", "guidance_encoder": False},
        None,
    ),
]


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter non-trivial (gates 1), the layout unchanged; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith(".gate") else 0.3 * torch.randn(p.shape, generator=g))
            if name.endswith(("sigma_spatial", "range_temp")):
                p.abs_().add_(0.5)
    return module.eval()


def _split(flags: dict) -> tuple[dict, dict]:
    layout = {k: v for k, v in flags.items() if k in ("range_kernel", "guidance_encoder", "kernel_fixup",
                                                      "constrained_fixup", "original")}  # fmt: skip
    return layout, {k: v for k, v in flags.items() if k not in layout}


def _inputs(feat_dim: int | None):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, feat_dim or 3, 5, 6, generator=g), torch.rand(1, 3, 37, 41, generator=g)


@pytest.mark.parametrize("old, variant, safe_start", OLD_TO_NEW)
def test_old_flags_build_the_named_variant_with_a_deprecation_warning(old, variant, safe_start):
    layout, rest = _split(old)
    hyper = {**SMALL, **rest}
    with pytest.warns(DeprecationWarning, match=r"use JBUStack\(variant=") as record:
        torch.manual_seed(0)
        from_flags = JBUStack(**layout, **hyper)
    assert repr(variant) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        named = JBUStack(
            variant=variant, **hyper, **({} if safe_start is None else {"safe_start": safe_start})
        )
    assert named.config() == from_flags.config() and named.variant == from_flags.variant == variant
    for (key, a), b in zip(from_flags.state_dict().items(), named.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    x, image = _inputs(from_flags.feat_dim)
    torch.testing.assert_close(named.eval()(x, image), from_flags.eval()(x, image), atol=0, rtol=0)


@pytest.mark.parametrize("old, variant, safe_start", OLD_TO_NEW)
def test_configs_saved_with_the_old_flags_load_to_identical_outputs(tmp_path, old, variant, safe_start):
    layout, rest = _split(old)
    with pytest.warns(DeprecationWarning):
        up = _randomized(JBUStack(**layout, **{**SMALL, **rest}), seed=3)
    flat = up.config()  # what every release so far wrote: the layout flags, no variant
    assert set(layout) <= set(flat) and "variant" not in flat
    path = save_checkpoint(
        tmp_path / "old", up.state_dict(), {"class": "JBUStack", "kwargs": flat, "extra": {}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a saved config warns about nothing
        loaded = JBUStack.load(path)
    assert loaded.config() == flat and loaded.variant == variant
    x, image = _inputs(up.feat_dim)
    torch.testing.assert_close(loaded(x, image), up(x, image), atol=0, rtol=0)


def test_registry_names_map_onto_the_variants():
    assert create_upsampler("jbu").variant == "default" and JBUStack().safe_start
    paper = create_upsampler("jbu_paper")
    assert paper.variant == "paper" and not paper.safe_start
    assert paper.config() == JBUStack(variant="paper").config()
    original = create_upsampler("jbu_original", feat_dim=6)
    assert original.variant == "original" and original.config() == JBUStack(6, variant="original").config()
    # the variant's layout is what the module reports
    for name, layout in VARIANTS.items():
        up = JBUStack(6 if name == "original" else None, variant=name)
        assert (up.range_kernel, up.encoder is not None, up.kernel_fixup, up.constrained_fixup) == tuple(
            layout[k] for k in ("range_kernel", "guidance_encoder", "kernel_fixup", "constrained_fixup")
        )
    # a custom layout equal to a named one is that variant
    assert JBUStack(variant={"kernel_fixup": True}).variant == "default"


def test_from_original_builds_the_original_variant():
    ref = _randomized(JBUStack(6, variant="original"), seed=5)
    loaded = JBUStack.from_original({f"upsampler.{k}": v for k, v in ref.state_dict().items()})
    assert loaded.variant == "original" and loaded.config() == ref.config()
    x, image = _inputs(6)
    torch.testing.assert_close(loaded(x, image), ref(x, image), atol=0, rtol=0)


def test_bad_variants_are_clear_errors():
    with pytest.raises(ValueError, match="variant in"):
        JBUStack(variant="fast")
    with pytest.raises(TypeError, match="variant as a name"):
        JBUStack(variant=3)
    with pytest.raises(TypeError, match="layout option"):
        JBUStack(variant={"range": "dot"})
    with pytest.raises(ValueError, match="range_kernel"):
        JBUStack(variant={"range_kernel": "cosine"})
    with pytest.raises(TypeError, match="unexpected keyword"):
        JBUStack(kernel_fix=True)
    with pytest.raises(ValueError, match="feat_dim"):
        JBUStack(variant="original")


def test_a_run_resumes_with_the_same_stack_built_either_way(tmp_path):
    """train_jbu compares the given stack with the checkpoint's in one form: the variant and the old flags
    that build it are the same stack; another layout is refused."""
    from featup.core import train_jbu
    from featup.core.checkpoint import CheckpointError

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.AvgPool2d(4)).requires_grad_(False)
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    run = dict(batch_size=2, kernel_size=4, progress=False, checkpoint_dir=tmp_path)
    train_jbu(backbone, images, steps=1, upsampler=JBUStack(variant="paper", **SMALL), **run)
    with pytest.warns(DeprecationWarning):
        old = JBUStack(
            range_kernel="dot", guidance_encoder=False, kernel_fixup=False, safe_start=False, **SMALL
        )
    train_jbu(backbone, images, steps=2, upsampler=old, **run)
    with pytest.raises(CheckpointError, match="holds a JBUStack"):
        train_jbu(backbone, images, steps=3, upsampler=JBUStack(**SMALL), **run)
