"""Tiled inference equals untiled inference, and touches only tile-sized crops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featup.core.tiling import DEFAULT_HALO_CELLS, alignment_unit, halo_for, plan_tiles, tiled_upsample
from featup.kernels import adaptive_conv


class MiniJBU(nn.Module):
    """An independent JBU-style stack (pooled guidance, bicubic source, 7x7 softmax range, reflect pad).

    Written here, not imported, so the tiling test does not depend on one implementation's details.
    """

    guided = True

    def __init__(self, radius: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.r = radius
        self.w1 = nn.Parameter(torch.randn(8, 3, 1, 1, generator=g))
        self.w2 = nn.Parameter(torch.randn(8, 8, 1, 1, generator=g) / 3)
        self.fix = nn.Parameter(torch.randn(4, 4, 1, 1, generator=g) / 4)

    def stage(self, src: torch.Tensor, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        r, k = self.r, 2 * self.r + 1
        guide = F.adaptive_avg_pool2d(image, size)
        src = F.interpolate(src, size, mode="bicubic", align_corners=False)
        q = F.conv2d(F.gelu(F.conv2d(guide, self.w1.to(guide.dtype))), self.w2.to(guide.dtype))
        keys = F.unfold(F.pad(q, (r, r, r, r), mode="reflect"), k).view(q.shape[0], q.shape[1], k * k, *size)
        logits = (q.unsqueeze(2) * keys).sum(1)  # (B, K*K, H, W)
        grid = torch.linspace(-1, 1, k, dtype=q.dtype)
        spatial = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / 2).reshape(1, k * k, 1, 1)
        kern = torch.softmax(logits, dim=1) * spatial
        kern = kern / kern.sum(1, keepdim=True)
        filters = kern.permute(0, 2, 3, 1).reshape(q.shape[0], *size, k, k)
        return adaptive_conv(F.pad(src, (r, r, r, r), mode="reflect"), filters)

    def forward(self, lr, image, output_size):
        h, w = lr.shape[-2:]
        n = max(1, math.ceil(math.log2(output_size[0] / h)))
        x = lr
        for i in range(1, n + 1):
            x = self.stage(x, image, (h * 2**i, w * 2**i))
        x = x + F.conv2d(x, self.fix.to(x.dtype)) if x.shape[1] == 4 else x
        return F.interpolate(x, output_size, mode="bilinear", align_corners=False)


class Recorder(nn.Module):
    """Wraps an upsampler and records the shapes of every call."""

    def __init__(self, up) -> None:
        super().__init__()
        self.up, self.calls = up, []
        self.guided = getattr(up, "guided", True)

    def forward(self, lr, image, output_size):
        self.calls.append(
            (tuple(lr.shape), None if image is None else tuple(image.shape), tuple(output_size))
        )
        return self.up(lr, image, output_size=output_size)


def _inputs(b, c, h, w, ih, iw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, h, w, generator=g, dtype=torch.float64),
        torch.rand(b, 3, ih, iw, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("lr_hw", "img_hw", "out_hw", "tile"),
    [
        ((14, 17), (56, 68), None, 20),  # 4x, odd non-square, output = image size
        ((18, 21), (72, 84), (36, 42), 8),  # output smaller than the image (2x), image guidance at 4x
        ((12, 9), (40, 30), None, 10),  # non-integer ratio 10/3: alignment unit of 3 cells
    ],
)
def test_tiled_equals_untiled_mini_jbu(lr_hw, img_hw, out_hw, tile):
    up = MiniJBU().double().eval()
    lr, img = _inputs(2, 4, *lr_hw, *img_hw)
    with torch.no_grad():
        ref = up(lr, img, out_hw or img_hw)
    rec = Recorder(up)
    tiled = tiled_upsample(rec, lr, img, out_hw, tile=tile)
    assert tiled.shape == ref.shape
    assert len(rec.calls) > 1  # really tiled
    torch.testing.assert_close(tiled, ref, rtol=1e-10, atol=1e-10)


def test_halo_is_needed():
    """Without a halo, tile seams differ from the untiled result: the equality above is not vacuous."""
    up = MiniJBU().double().eval()
    lr, img = _inputs(1, 4, 16, 16, 64, 64)
    with torch.no_grad():
        ref = up(lr, img, (64, 64))
    bad = tiled_upsample(up, lr, img, tile=16, overlap=0)
    assert (bad - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "lr_hw", "scale", "tile"),
    [({}, (20, 23), 4, 24), ({"original": True, "feat_dim": 6}, (9, 7), 16, 80)],
)
def test_tiled_equals_untiled_jbu_stack(kwargs, lr_hw, scale, tile):
    from featup.core.jbu import JBUStack

    torch.manual_seed(0)
    up = JBUStack(**kwargs).double().eval()
    lr, img = _inputs(1, 6, *lr_hw, lr_hw[0] * scale, lr_hw[1] * scale, seed=1)
    with torch.no_grad():
        ref = up(lr, img)
    rec = Recorder(up)
    tiled = tiled_upsample(rec, lr, img, tile=tile)
    assert len(rec.calls) >= 4
    torch.testing.assert_close(tiled, ref, rtol=1e-9, atol=1e-9)
    assert up.consistency == JBUStack(**kwargs).consistency  # switched off for the tiles, then back on
    # r + 2 s + 1, plus one cell for a guidance encoder (see halo_for)
    assert halo_for(up) == (8.0 if up.resize_mode == "bicubic" else 6.0) + (up.encoder is not None)


def test_tiled_bilinear_unguided():
    from featup.core import create_upsampler

    up = create_upsampler("bilinear")
    lr, _ = _inputs(1, 3, 10, 13, 1, 1)
    ref = up(lr, None, (40, 52))
    torch.testing.assert_close(tiled_upsample(up, lr, None, (40, 52), tile=8), ref, rtol=1e-10, atol=1e-10)


def _bilinear(lr, image, output_size):
    return F.interpolate(lr, output_size, mode="bilinear", align_corners=False)


def test_memory_bounded_structurally():
    """Each call sees at most tile + 2 halo cells, however large the output; the cores partition it."""
    tile, halo = 16, DEFAULT_HALO_CELLS
    for n_lr in (24, 48, 96):
        lr, img = _inputs(1, 2, n_lr, n_lr, 4 * n_lr, 4 * n_lr)
        rec = Recorder(_bilinear)
        tiled_upsample(rec, lr, img, tile=tile)
        core_cells = tile // 4
        assert len(rec.calls) == math.ceil(n_lr / core_cells) ** 2
        for lr_shape, img_shape, out_size in rec.calls:
            assert max(lr_shape[-2:]) <= core_cells + 2 * halo
            assert max(out_size) <= 4 * (core_cells + 2 * halo)
            assert img_shape[-2:] == out_size
    plan = plan_tiles((48, 40), (192, 160), (192, 160), tile=16)
    covered = torch.zeros(192, 160, dtype=torch.int32)
    for t in plan:
        (y0, y1), (x0, x1) = t.core_out
        covered[y0:y1, x0:x1] += 1
    assert bool((covered == 1).all())


def test_implicit_rendered_in_chunks():
    from featup.core.implicit import ImplicitUpsampler
    from featup.core.pca import PCA

    torch.manual_seed(0)
    imp = ImplicitUpsampler(6, (20, 24), pca_dim=4, hidden_dim=16, n_freqs=4).eval()
    imp.set_image(torch.rand(1, 3, 20, 24))
    imp.set_pca(PCA(6, 4).fit(torch.randn(1, 6, 8, 8)))
    lr = torch.randn(1, 6, 5, 6)
    ref = imp.render((40, 36))
    torch.testing.assert_close(tiled_upsample(imp, lr, None, (40, 36), tile=7), ref, rtol=1e-6, atol=1e-6)
    buf = torch.zeros(1, 6, 40, 36)
    assert tiled_upsample(imp, lr, None, (40, 36), tile=7, out=buf) is buf
    torch.testing.assert_close(buf, ref, rtol=1e-6, atol=1e-6)


def test_implicit_rejects_a_batch_and_other_channels_like_its_upsample():
    """Issue 13 item 7: a batch of 2 came back as one image's (1, C, H, W) rendering without an error."""
    from featup.core.implicit import ImplicitUpsampler
    from featup.core.pca import PCA

    torch.manual_seed(0)
    imp = ImplicitUpsampler(6, (20, 24), pca_dim=4, hidden_dim=16, n_freqs=4).eval()
    imp.set_image(torch.rand(1, 3, 20, 24))
    imp.set_pca(PCA(6, 4).fit(torch.randn(1, 6, 8, 8)))
    with pytest.raises(ValueError, match=r"fitted to one image: expected lr_feats \(1,C,h,w\), got \(2, 6"):
        tiled_upsample(imp, torch.randn(2, 6, 5, 6), None, (40, 36), tile=7)
    with pytest.raises(ValueError, match=r"expected lr_feats with 6 channels"):
        tiled_upsample(imp, torch.randn(1, 5, 5, 6), None, (40, 36), tile=7)
    # the same errors as calling the upsampler itself
    with pytest.raises(ValueError, match="fitted to one image"):
        imp(torch.randn(2, 6, 5, 6), None, output_size=(40, 36))


def test_out_buffer_and_alignment():
    assert alignment_unit(256, 4096) == 1
    assert alignment_unit(292, 4096) == 73
    assert alignment_unit(14, 224, 224) == 1
    assert alignment_unit(12, 40, 30) == 6
    up = MiniJBU().double().eval()
    lr, img = _inputs(1, 4, 8, 8, 32, 32)
    buf = torch.zeros(1, 4, 32, 32, dtype=torch.float64)
    res = tiled_upsample(up, lr, img, tile=8, out=buf)
    assert res is buf and buf.abs().sum() > 0
    with pytest.raises(ValueError, match="expected out of shape"):
        tiled_upsample(up, lr, img, tile=8, out=torch.zeros(1, 3, 32, 32, dtype=torch.float64))


def test_exceptions():
    up = MiniJBU().double().eval()
    lr, img = _inputs(1, 4, 8, 8, 32, 32)
    with pytest.raises(ValueError, match="expected tile >= 1"):
        tiled_upsample(up, lr, img, tile=0)
    with pytest.raises(ValueError, match="expected overlap >= 0"):
        tiled_upsample(up, lr, img, overlap=-1)
    with pytest.raises(ValueError, match=r"\(B,C,h,w\)"):
        tiled_upsample(up, lr[0], img)
    with pytest.raises(ValueError, match="guided"):
        tiled_upsample(up, lr, None, (32, 32))
    with pytest.raises(ValueError, match="batch size"):
        tiled_upsample(up, lr, img.expand(2, -1, -1, -1))
