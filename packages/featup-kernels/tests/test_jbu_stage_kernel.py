"""featup.kernels.jbu_stage_kernel: one JBU stage's per-pixel kernels in one pass.

Checked against the formula written with torch ops (float64), on both CPU kernel builds, in float32 (to float
rounding) and float64 (tightly); with and without the base kernel, the gate and the correction; bitwise
identical for any thread count; argument checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.kernels import has_jbu_stage_kernel, jbu_stage_kernel


def _reference(keys, log_spatial, temp, rgb=None, cls=None, cscale=0.0, gate=None, g=None, w=None):
    """The op's formula, step by step in torch (pixel-major output)."""
    taps = log_spatial.numel()
    k = int(round(taps**0.5))
    r = k // 2
    b, _, hp, wp = keys.shape
    h, wd = hp - 2 * r, wp - 2 * r

    def sqdist(v):
        centre = v[:, :, r : r + h, r : r + wd]
        return torch.stack(
            [(centre - v[:, :, i : i + h, j : j + wd]).square().sum(1) for i in range(k) for j in range(k)],
            -1,
        )  # (B, H, W, taps)

    n = torch.softmax(-temp * sqdist(keys) + log_spatial, -1)
    if w is not None:
        w1k, w1g, b1, w2, b2 = w
        mirror = torch.arange(taps).view(k, k).flip(1).reshape(-1)
        u = g.permute(0, 2, 3, 1) @ w1g.t() + b1
        a0 = F.gelu(u + n @ w1k.t())
        a1 = F.gelu(u + n[..., mirror] @ w1k.t())
        d = 0.5 * (torch.tanh(a0 @ w2.t() + b2) + torch.tanh(a1 @ w2.t() + b2)[..., mirror])
        d = 0.1 * (d - d.mean(-1, keepdim=True))
    else:
        d = torch.zeros_like(n)
    if gate is None:
        return n + d
    if rgb is not None:
        base = torch.exp(cscale * sqdist(rgb) + cls)
        base = base / base.sum(-1, keepdim=True)
    else:
        base = torch.zeros(taps, dtype=n.dtype)
        base[taps // 2] = 1
    return d + (1 - gate) * base + gate * n


def _case(b, h, w, k, d, g, hd, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r, taps = k // 2, k * k

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    keys = rand(b, d, h + 2 * r, w + 2 * r, scale=0.5)
    coords = torch.linspace(-1, 1, k, dtype=torch.float64)
    d2 = (coords[:, None] ** 2 + coords[None, :] ** 2).reshape(-1)
    log_spatial = (-d2 / (2 * 0.8**2)).to(dtype)
    cls = (-d2 / (2 * 0.5**2)).to(dtype)
    rgb = torch.rand(b, 3, h + 2 * r, w + 2 * r, generator=gen, dtype=torch.float64).to(dtype)
    guid = rand(b, g, h, w)
    weights = (rand(hd, taps), rand(hd, g, scale=0.3), rand(hd), rand(taps, hd, scale=0.3), rand(taps))
    return keys, log_spatial, cls, rgb, guid, weights


# (B, H, W, K, D, G, hidden): odd, non-square, rows longer than one segment, batch > 1
SIZES = [(1, 5, 7, 7, 32, 32, 49), (2, 3, 70, 5, 4, 6, 25), (1, 9, 2, 3, 3, 2, 7), (2, 1, 1, 1, 2, 3, 1)]
VARIANTS = ["classic", "delta", "no_gate", "no_correction"]


def _call(case, variant, temp=1.7, gate=0.6):
    keys, ls, cls, rgb, guid, (w1k, w1g, b1, w2, b2) = case
    kw = {}
    if variant in ("classic", "delta", "no_correction"):
        kw["gate"] = gate
    if variant in ("classic", "no_correction"):
        kw.update(rgb=rgb, classic_log_spatial=cls, classic_scale=-50.0)
    if variant != "no_correction":
        kw.update(guidance=guid, w1k=w1k, w1g=w1g, b1=b1, w2=w2, b2=b2)
    out = jbu_stage_kernel(keys, ls, temp, **kw)
    ref_w = None if variant == "no_correction" else (w1k, w1g, b1, w2, b2)
    as64 = [
        None if t is None else t.double() for t in (keys, ls, kw.get("rgb"), kw.get("classic_log_spatial"))
    ]
    ref = _reference(
        as64[0], as64[1], temp, as64[2], as64[3], -50.0, kw.get("gate"),
        guid.double(), None if ref_w is None else [t.double() for t in ref_w],
    )  # fmt: skip
    return out, ref


def test_this_build_has_the_op():
    assert has_jbu_stage_kernel("cpu")
    assert not has_jbu_stage_kernel("meta")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", SIZES)
def test_equals_the_formula(cpu_isa, size, variant):
    b, h, w, k, d, g, hd = size
    out, ref = _call(_case(b, h, w, k, d, g, hd, torch.float64), variant)
    assert out.shape == (b, h, w, k * k) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    out32, _ = _call(_case(b, h, w, k, d, g, hd, torch.float32), variant)
    assert out32.dtype == torch.float32
    # float32 inputs are the float64 ones rounded: the difference is float32 rounding
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=2e-6)


def test_kernels_sum_to_one(cpu_isa):
    out, _ = _call(_case(2, 6, 9, 7, 8, 5, 49, torch.float32), "classic")
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 6, 9), rtol=0, atol=1e-5)


def test_large_distances_do_not_underflow_into_nan(cpu_isa):
    keys, ls, *_ = _case(1, 4, 5, 3, 2, 1, 1, torch.float32)
    out = jbu_stage_kernel(keys * 1e3, ls, 1e4)  # every logit but the centre's far below exp's range
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 4], torch.ones(1, 4, 5))


def test_bitwise_identical_for_any_thread_count():
    case = _case(2, 11, 13, 7, 8, 5, 49, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _call(case, "classic")
        torch.set_num_threads(3)
        three, _ = _call(case, "classic")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_argument_errors():
    keys, ls, cls, rgb, guid, (w1k, w1g, b1, w2, b2) = _case(1, 4, 5, 3, 2, 3, 9, torch.float32)
    with pytest.raises(ValueError, match="keys"):
        jbu_stage_kernel(keys[0], ls, 1.0)
    with pytest.raises(ValueError, match="K\\*K taps"):
        jbu_stage_kernel(keys, ls[:8], 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        jbu_stage_kernel(keys.half(), ls, 1.0)
    with pytest.raises(ValueError, match="rgb"):
        jbu_stage_kernel(keys, ls, 1.0, rgb=rgb[..., 1:], classic_log_spatial=cls, gate=0.5)
    with pytest.raises(ValueError, match="gate"):
        jbu_stage_kernel(keys, ls, 1.0, rgb=rgb, classic_log_spatial=cls)
    with pytest.raises(ValueError, match="all given or all None"):
        jbu_stage_kernel(keys, ls, 1.0, guidance=guid, w1k=w1k)
    with pytest.raises(ValueError, match="w2"):
        jbu_stage_kernel(keys, ls, 1.0, guidance=guid, w1k=w1k, w1g=w1g, b1=b1, w2=w2[:, 1:], b2=b2)
    with pytest.raises(ValueError, match="log_spatial"):
        jbu_stage_kernel(keys, ls.double(), 1.0)


@pytest.mark.parametrize("variant", ["classic", "plain"])
def test_schema_and_fake_kernel(variant):
    """The registered schema and the fake (meta) kernel agree with the CPU kernel (torch.compile traces it)."""
    keys, ls, cls, rgb, guid, (w1k, w1g, b1, w2, b2) = _case(2, 5, 7, 3, 4, 3, 9, torch.float32)
    if variant == "classic":
        args = (keys, rgb, guid, ls, cls, w1k, w1g, b1, w2, b2, 1.5, -50.0, 0.5)
    else:
        args = (keys, None, None, ls, None, None, None, None, None, None, 1.5, 0.0, None)
    result = torch.library.opcheck(
        torch.ops.featup.jbu_stage_kernel.default, args, test_utils=("test_schema", "test_faketensor")
    )
    assert set(result.values()) == {"SUCCESS"}


# ---- jbu_stage_filters: the same kernels as composite filters of a resize-pad plan ----------------------------


def _plan(h, w, k, wd, py, px, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(h, k, wd, generator=gen, dtype=torch.float64).to(dtype)
    cols = torch.randn(w, k, wd, generator=gen, dtype=torch.float64).to(dtype)
    return rows, cols, (py, px)


def _composite(kernels, rows, cols, phases):
    """The composite filters written with torch ops: F[y, x, a, c] = sum_ij rows[y, i, a] k[y, x, i, j] cols[x, j, c],
    phase-major (B, py, px, H / py, W / px, Wd, Wd)."""
    b, h, w, taps = kernels.shape
    k = int(round(taps**0.5))
    py, px = phases
    f = torch.einsum(
        "yia,byxij,xjc->byxac", rows.double(), kernels.double().view(b, h, w, k, k), cols.double()
    )
    wd = rows.shape[-1]
    return f.view(b, h // py, py, w // px, px, wd, wd).permute(0, 2, 4, 1, 3, 5, 6)


@pytest.mark.parametrize(
    "size, wd, phases",
    [
        ((1, 6, 8, 7, 32, 32, 49), 7, (2, 2)),
        ((2, 4, 70, 5, 4, 6, 25), 6, (2, 1)),
        ((1, 9, 3, 3, 3, 2, 7), 3, (1, 1)),
    ],
)
@pytest.mark.parametrize("variant", ["classic", "no_gate"])
def test_filters_are_the_kernels_composited_with_the_plan(cpu_isa, size, wd, phases, variant):
    from featup.kernels import has_jbu_stage_filters, jbu_stage_filters

    assert has_jbu_stage_filters("cpu") and not has_jbu_stage_filters("meta")
    b, h, w, k, d, g, hd = size
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        case = _case(b, h, w, k, d, g, hd, dtype)
        keys, ls, cls, rgb, guid, (w1k, w1g, b1, w2, b2) = case
        kw = {"guidance": guid, "w1k": w1k, "w1g": w1g, "b1": b1, "w2": w2, "b2": b2}
        if variant == "classic":
            kw.update(gate=0.6, rgb=rgb, classic_log_spatial=cls, classic_scale=-50.0)
        rows, cols, ph = _plan(h, w, k, wd, *phases, dtype)
        out = jbu_stage_filters(keys, ls, 1.7, resize_rows=rows, resize_cols=cols, phases=ph, **kw)
        kernels = jbu_stage_kernel(keys, ls, 1.7, **kw)
        ref = _composite(kernels, rows, cols, ph)
        assert out.shape == ref.shape and out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * max(1.0, float(ref.abs().max())))


def test_filters_argument_errors_and_fake_kernel():
    from featup.kernels import jbu_stage_filters

    keys, ls, *_ = _case(1, 4, 6, 3, 2, 3, 9, torch.float32)
    rows, cols, _ = _plan(4, 6, 3, 4, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="phases"):
        jbu_stage_filters(keys, ls, 1.0, resize_rows=rows, resize_cols=cols, phases=(3, 2))
    with pytest.raises(ValueError, match="resize_cols"):
        jbu_stage_filters(keys, ls, 1.0, resize_rows=rows, resize_cols=cols[1:], phases=(2, 2))
    with pytest.raises(ValueError, match="resize_rows"):
        jbu_stage_filters(keys, ls, 1.0, resize_rows=rows.double(), resize_cols=cols, phases=(2, 2))
    args = (keys, None, None, ls, None, None, None, None, None, None, 1.5, 0.0, None, rows, cols, 2, 2)
    result = torch.library.opcheck(
        torch.ops.featup.jbu_stage_filters.default, args, test_utils=("test_schema", "test_faketensor")
    )
    assert set(result.values()) == {"SUCCESS"}
