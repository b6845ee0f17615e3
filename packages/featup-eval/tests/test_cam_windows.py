"""tools/cam_windows.py: the window set, the paired statistics, the blend and its argument checks (the full
run takes minutes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from eval_tools import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("cam_windows")


def test_windows_are_real_distinct_crops_and_mirrors(tool):
    labels, images = tool.windows(("chelsea",), scales=(224, 288))
    # chelsea is landscape: at 224 one row of 3 positions, at 288 3 x 3 positions; each with its mirror
    assert images.shape == ((3 + 9) * 2, 3, 224, 224) and len(labels) == len(set(labels)) == 24
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(images[1], images[0].flip(-1))  # each window is followed by its mirror image
    assert not torch.equal(images[0], images[2])
    assert all(label.startswith("chelsea@") for label in labels)


def test_paired_differences_mean_standard_error_and_per_photo(tool):
    drop = torch.tensor([10.0, 20.0, 30.0, 40.0])
    ref = torch.tensor([12.0, 18.0, 30.0, 30.0])  # differences -2, 2, 0, 10
    out = tool.paired(drop, ref, ["a", "a", "b", "b"])
    assert out["drop_vs_bilinear"] == pytest.approx(2.5)
    assert out["drop_vs_bilinear_se"] == pytest.approx(torch.tensor([-2.0, 2, 0, 10]).std().item() / 2)
    assert out["drop_vs_bilinear_by_photo"] == {"a": pytest.approx(0.0), "b": pytest.approx(5.0)}


def test_per_window_drops_average_to_the_benchs_average_drop(tool):
    from featup.eval.cam import average_drop, cam_masked_image

    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    cams = torch.rand(3, 32, 32)
    weights = torch.randn(3, 5)

    def probs(x):  # a toy classifier on the mean colour
        return (x.mean(dim=(2, 3)) @ weights * 4).softmax(-1)

    classes = torch.tensor([0, 3, 4])
    drops = tool.per_window(images, cams, classes, probs)
    idx = torch.arange(3)
    y, o = probs(images)[idx, classes], probs(cam_masked_image(images, cams))[idx, classes]
    assert drops.shape == (3,) and float(drops.mean()) == pytest.approx(average_drop(y, o), rel=1e-6)


def test_blend_ends_are_the_method_without_and_with_its_back_projection(tool):
    from featup.core.consistency import back_project, pool_to

    torch.manual_seed(0)
    x, image = torch.randn(1, 4, 7, 7), torch.rand(1, 3, 56, 56)
    pre = tool.upsampler("bicubic_bp", back_projection=False)
    full = tool.upsampler("bicubic_bp")
    with torch.inference_mode():
        torch.testing.assert_close(tool.blended(pre, 0.0)(x, image), pre(x, image))
        torch.testing.assert_close(tool.blended(pre, 1.0)(x, image), full(x, image), atol=1e-5, rtol=1e-5)
        half = tool.blended(pre, 0.5)(x, image)
        out = pre(x, image)
        torch.testing.assert_close(half, (out + back_project(out, x)) / 2, atol=1e-5, rtol=1e-5)
        # half the back-projection closes half the gap to the input's cell means
        torch.testing.assert_close(
            pool_to(half, (7, 7)) - x, (pool_to(out, (7, 7)) - x) / 2, atol=1e-5, rtol=1e-5
        )


def test_shipped_jbu_without_back_projection_is_its_pre_step_output(tool):
    on, off = tool.upsampler("jbu_shipped"), tool.upsampler("jbu_shipped", back_projection=False)
    assert on.consistency and not off.consistency


def test_a_saved_jbu_loads_as_saved_and_without_its_back_projection(tool, tmp_path):
    from featup.core import JBUStack

    torch.manual_seed(0)
    saved = JBUStack(consistency=False)
    with torch.no_grad():  # not a fresh stack: the loaded weights must be the saved ones
        for w in saved.parameters():
            w.add_(0.05 * torch.randn_like(w))
    path = saved.save(tmp_path / "jbu")
    p = tool.argparse.ArgumentParser()
    checkpoints = tool.parse_checkpoints([f"mine={path.with_suffix('')}"], p)
    assert checkpoints == {"mine": path.with_suffix("")}
    up = tool.upsampler("mine", checkpoint=checkpoints["mine"])
    off = tool.upsampler("mine", back_projection=False, checkpoint=checkpoints["mine"])
    assert not up.consistency and not off.consistency and not up.training
    x, image = torch.randn(1, 4, 7, 7), torch.rand(1, 3, 56, 56)
    with torch.inference_mode():
        torch.testing.assert_close(up(x, image), saved.eval()(x, image))


class _Head:
    """The CAM of a linear 'backbone head': class weights dotted with each cell (as EfficientNet's)."""

    def __init__(self, dim: int) -> None:
        self.weight = torch.randn(10, dim)

    def class_activation_map(self, feats, classes):
        return torch.einsum("bc,bchw->bhw", self.weight[classes], feats)


def test_linearity_check_passes_for_linear_methods_and_catches_a_nonlinear_one(tool):
    torch.manual_seed(0)
    head, lr, image, cls = _Head(6), torch.randn(1, 6, 7, 7), torch.rand(1, 3, 56, 56), torch.tensor([3])
    cam_lr = head.class_activation_map(lr, cls)[:, None]
    for name in ("bilinear", "jbu_classic_bp"):
        assert tool.check_linear(tool.upsampler(name), head, lr, cam_lr, image, cls) < 1e-4

    def squared(x, img):
        return F.interpolate(x, size=img.shape[-2:], mode="bilinear", align_corners=False) ** 2

    assert tool.check_linear(squared, head, lr, cam_lr, image, cls) > 1e-2


@pytest.mark.parametrize(
    "argv",
    [
        ["--methods", "implicit"],
        ["--methods", ""],
        ["--confidence", "1.5"],
        ["--blend", "0.5,2"],
        ["--blend", "half"],
        ["--photos", "test"],
        ["--checkpoint", "no-equals-sign"],
        ["--checkpoint", "bilinear=/tmp"],
        ["--checkpoint", "x=/nonexistent/jbu"],
    ],
)
def test_bad_arguments_are_refused(tool, argv):
    with pytest.raises(SystemExit):
        tool.main(argv)
