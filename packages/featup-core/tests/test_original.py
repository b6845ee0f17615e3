"""The original FeatUp JBU layout: loader and forward pass against a reference written from FIELD.md."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from featup.core import JBUStack, channel_norm, original_checkpoint_url
from featup.core.checkpoint import CheckpointError

torch.set_num_threads(1)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def original_state_dict(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published layout (key names and shapes as listed in FIELD.md)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return scale * torch.randn(shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    for k in range(1, 5):
        p = f"up{k}."
        sd[p + "range_temp"] = torch.rand((), generator=g) - 0.5
        sd[p + "sigma_spatial"] = 0.6 + torch.rand((), generator=g)
        sd[p + "range_proj.0.weight"] = rnd(32, 3, 1, 1, scale=1.0)
        sd[p + "range_proj.0.bias"] = rnd(32)
        sd[p + "range_proj.3.weight"] = rnd(32, 32, 1, 1)
        sd[p + "range_proj.3.bias"] = rnd(32)
        sd[p + "fixup_proj.0.weight"] = rnd(49, 52, 1, 1)
        sd[p + "fixup_proj.0.bias"] = rnd(49)
        sd[p + "fixup_proj.3.weight"] = rnd(49, 49, 1, 1)
        sd[p + "fixup_proj.3.bias"] = rnd(49)
    sd["fixup_proj.1.weight"] = rnd(dim, dim, 1, 1)
    sd["fixup_proj.1.bias"] = rnd(dim)
    return sd


def lightning_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    state = {f"upsampler.{k}": v for k, v in sd.items()}
    state["model.0.weight"] = torch.randn(4, 3)  # backbone and training-only modules are ignored
    state["scale_net.weight"] = torch.randn(1, 5, 1, 1)
    state["downsampler.kernel"] = torch.randn(16, 16)
    return {"state_dict": state, "epoch": 3, "global_step": 2000, "pytorch-lightning_version": "1.9.0"}


def _conv1x1(x, sd, key):
    return F.conv2d(x, sd[key + ".weight"], sd[key + ".bias"])


def reference_stage(source, guidance, sd, p):
    """One original stage written out from FIELD.md with unfold (independent of featup.core)."""
    b, _, h, w = guidance.shape
    keys = _conv1x1(F.gelu(_conv1x1(guidance, sd, p + "range_proj.0")), sd, p + "range_proj.3")
    patches = F.unfold(F.pad(keys, [3] * 4, mode="reflect"), 7).view(b, 32, 49, h, w)
    temp = sd[p + "range_temp"].exp().clamp(1e-4, 1e4)
    range_kernel = torch.softmax(temp * torch.einsum("bcphw,bchw->bphw", patches, keys), dim=1)
    grid = torch.linspace(-1, 1, 7)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    spatial = torch.exp(-(gy**2 + gx**2) / (2 * sd[p + "sigma_spatial"] ** 2)).view(1, 49, 1, 1)
    kernel = range_kernel * spatial
    kernel = kernel / kernel.sum(1, keepdim=True).clamp(1e-7)
    fix = _conv1x1(
        F.gelu(_conv1x1(torch.cat([kernel, guidance], 1), sd, p + "fixup_proj.0")), sd, p + "fixup_proj.3"
    )
    kernel = kernel + 0.1 * fix
    src = F.interpolate(source, (h, w), mode="bicubic", align_corners=False)
    src_patches = F.unfold(F.pad(src, [3] * 4, mode="reflect"), 7).view(b, source.shape[1], 49, h, w)
    return torch.einsum("bcphw,bphw->bchw", src_patches, kernel)


def reference_stack(feats, image, sd):
    guidance = (image - MEAN) / STD  # the original models were guided by the ImageNet-normalized image
    x = feats
    for k in range(1, 5):
        small = F.adaptive_avg_pool2d(guidance, (2 * x.shape[-2], 2 * x.shape[-1]))
        x = reference_stage(x, small, sd, f"up{k}.")
    return x + 0.1 * _conv1x1(x, sd, "fixup_proj.1")


@pytest.mark.parametrize(
    "form", ["state_dict", "prefixed", "lightning_dict", "ckpt_file", "safetensors_file"]
)
def test_from_original_matches_reference_forward(form, tmp_path):
    dim = 5
    sd = original_state_dict(dim)
    ckpt = lightning_checkpoint(sd)
    if form == "state_dict":
        source = sd
    elif form == "prefixed":
        source = ckpt["state_dict"]
    elif form == "lightning_dict":
        source = ckpt
    elif form == "ckpt_file":
        source = tmp_path / "dino16_jbu_stack_cocostuff.ckpt"
        torch.save(ckpt, source)
    else:
        from safetensors.torch import save_file

        source = tmp_path / "jbu.safetensors"
        save_file({k: v.contiguous() for k, v in ckpt["state_dict"].items()}, str(source))
    up = JBUStack.from_original(source)
    assert isinstance(up, JBUStack) and up.original and not up.training and up.feat_dim == dim
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, dim, 4, 3, generator=g)
    image = torch.rand(2, 3, 64, 48, generator=g)  # 16x, the original's only ratio
    with torch.no_grad():
        torch.testing.assert_close(up(feats, image), reference_stack(feats, image, sd), atol=1e-4, rtol=1e-4)


def test_original_layout_accepts_other_sizes():
    up = JBUStack.from_original(original_state_dict(3))
    out = up(torch.randn(1, 3, 16, 16), torch.rand(1, 3, 224, 224))  # DINOv2 at 224: 224, not 256
    assert out.shape == (1, 3, 224, 224)
    assert up(torch.randn(1, 3, 5, 7), torch.rand(1, 3, 37, 51)).shape == (1, 3, 37, 51)


def test_state_dict_keys_are_the_original_names():
    sd = original_state_dict(6)
    assert set(JBUStack(6, original=True).state_dict()) == set(sd)


def test_missing_unexpected_and_misshaped_keys():
    sd = original_state_dict(4)
    broken = dict(sd)
    del broken["up3.range_proj.3.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['up3.range_proj.3.bias'\]"):
        JBUStack.from_original(broken)
    extra = dict(sd, **{"up5.range_temp": torch.tensor(0.0)})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        JBUStack.from_original(extra)
    wrong = dict(sd, **{"up2.range_proj.0.weight": torch.zeros(30, 3, 1, 1)})
    with pytest.raises(CheckpointError, match=r"up2.range_proj.0.weight.*\(32, 3, 1, 1\)"):
        JBUStack.from_original(wrong)
    nan = dict(sd, **{"up1.sigma_spatial": torch.tensor(float("nan"))})
    with pytest.raises(CheckpointError, match="non-finite"):
        JBUStack.from_original(nan)
    with pytest.raises(CheckpointError, match="not an original FeatUp JBU"):
        JBUStack.from_original({"state_dict": {"model.weight": torch.zeros(2)}})
    with pytest.raises(TypeError, match="path or a state dict"):
        JBUStack.from_original(42)


class _HyperParams:
    """Stands for the omegaconf / Lightning objects a real .ckpt pickles beside its state_dict."""

    def __init__(self) -> None:
        self.lr = 1e-3


class _Exploit:
    """Unpickling this would create a file if the reader ever called what a checkpoint names."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="found none"):
        JBUStack.from_original(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="could not read"):
        JBUStack.from_original(garbage)
    truncated = tmp_path / "truncated.ckpt"
    torch.save(lightning_checkpoint(original_state_dict(3)), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        JBUStack.from_original(truncated)


def test_lightning_file_with_pickled_objects_loads_without_running_them(tmp_path):
    state = original_state_dict(3)
    ckpt = lightning_checkpoint(state)
    ckpt["hyper_parameters"] = _HyperParams()  # refused by weights_only=True, read as an inert stand-in
    marker = tmp_path / "exploit-ran"
    ckpt["callbacks"] = {"evil": _Exploit(marker)}
    path = tmp_path / "dino16_jbu_stack_cocostuff.ckpt"
    torch.save(ckpt, path)
    up = JBUStack.from_original(path)
    assert not marker.exists()
    assert torch.equal(up.state_dict()["up1.range_temp"], state["up1.range_temp"])
    unsafe = tmp_path / "unsafe.ckpt"  # a pickle that is only an exploit is refused, never executed
    with unsafe.open("wb") as fh:
        pickle.dump(_Exploit(marker), fh, protocol=2)
    with pytest.raises(CheckpointError):
        JBUStack.from_original(unsafe)
    assert not marker.exists()


def test_channel_norm_and_urls():
    x = 3 * torch.randn(2, 7, 4, 5) + 1
    y = channel_norm(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(2, 4, 5), atol=1e-3, rtol=0)
    assert original_checkpoint_url("dinov2").endswith("/pretrained/dinov2_jbu_stack_cocostuff.ckpt")
    assert original_checkpoint_url("maskclip", use_norm=False).endswith(
        "/no_norm/maskclip_jbu_stack_cocostuff.ckpt"
    )
    with pytest.raises(ValueError):
        original_checkpoint_url("maskclip")
