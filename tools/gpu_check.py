"""One prepared GPU check: the fused kernel's tests, its speed and memory, the JBU, training and fitting speed.

Run on a machine with a CUDA GPU (about 5 minutes on one GPU; writes JSON and a markdown table):

    python tools/gpu_check.py                         # --device cuda when available
    python tools/gpu_check.py --out gpu-check         # gpu-check/gpu_check.json + gpu-check/gpu_check.md

CI runs the quick CPU mode so the script never rots (``nox -s gpu_check``, about two minutes):

    python tools/gpu_check.py --quick --device cpu

Sections (each one's failure is recorded, the others still run; the exit status is 1 if any check failed):

1. Kernel tests on the device: ``torch.library.opcheck`` of both ops, ``gradcheck`` and ``gradgradcheck`` in
   float64, parity of forward, input gradient and filter gradient with ``adaptive_conv_reference`` in float32,
   float16 and bfloat16, non-contiguous inputs, the autocast registration (bfloat16, float32 arguments), and
   the device result against the CUDA thread bodies run on the CPU (``featup::_emulate_cuda_threads_*``). On a
   GPU also a tensor larger than the capped CUDA grid (the grid-stride loop for real).
2. The paper's Table 6 shapes (``bench_kernels.PAPER_SHAPES``): forward and forward + backward time and peak
   memory of our op against the ``unfold`` and ``shifted`` routes of ``tools/bench_kernels.py``.
3. ``featup.core.JBUStack`` at 16x to 448 px with 384 channels: forward time and peak memory, next to the
   field's published A100 figures (not measured here; see PUBLISHED).
4. ``train_jbu`` steps per second at 224 px (float32 and ``precision="bfloat16"``) and ``fit_implicit``
   seconds for 2000 steps at 224 px, extrapolated from a timed few steps. The backbone is a randomly
   initialized ViT-S/16 (timm, 384 channels, the paper's DINO ViT-S/16 architecture; speed does not depend on
   the weights).

Times are medians of repeats after a warm-up, synchronized on CUDA. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` during the call, inputs and weights included ("total"); on the CPU, the
resident-set high-water mark above the resident set at the call's start (the script re-runs itself with
glibc's mmap threshold lowered so freed tensors leave the process). ``--quick`` shrinks every size (smaller
images, fewer steps, the smaller Table 6 shapes): a smoke run, its numbers are not the paper's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # the Table 6 routes and shapes, shared with the CPU benchmark

from featup.kernels import adaptive_conv, adaptive_conv_reference, build_info

# The field's published figures for 16x to 448 px, 384 channels, forward, on an A100 (NAF's speed/memory
# tests, as collected in docs FIELD.md). Reference columns only: not measured by this script.
PUBLISHED = {
    "FeatUp JBU (original), A100, published": {"forward_ms": "57-74", "peak_gb": "2.7-3.4"},
    "NAF, A100, published": {"forward_ms": "56", "peak_gb": "1.8"},
}
PAPER_FIT_IMPLICIT = "about 60 s for 2000 steps on an A100 (paper)"


# ---- measurement ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, budget: float, min_runs: int = 3) -> float:
    """Median wall milliseconds of ``fn()`` (synchronized), via ``bench_kernels.median_ms``."""

    def run() -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    return bk.median_ms(run, budget, min_runs=min_runs)


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of ``fn()`` in MB: CUDA allocator peak (total), or CPU resident high-water mark above start."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    bk.reset_peak_rss()
    base = bk.status_mb("VmRSS")
    fn()
    return bk.status_mb("VmHWM") - base


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 1. kernel tests --------------------------------------------------------------------------------------


def inputs(b, c, h, w, k, device, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen, dtype=torch.float64)
    f = torch.randn(b, h, w, k, k, generator=gen, dtype=torch.float64)
    g = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, f, g))


def op_and_grads(fn, x, f, g):
    x, f = x.detach().requires_grad_(True), f.detach().requires_grad_(True)
    out = fn(x, f)
    gx, gf = torch.autograd.grad(out, (x, f), g)
    return out.detach(), gx, gf


def max_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return (a.double() - e.double()).abs().max().item()


# Tolerance per dtype against the reference in the same dtype (both accumulate in float32 or float64 and
# round once; the summation order differs): float32 a few ulps of sums of ~K*K and ~C terms, the 16-bit types
# about two ulps of their own precision.
TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def kernel_checks(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Every kernel check as {"name", "ok", "detail"}; an exception fails that check only."""
    checks: list[dict[str, Any]] = []

    def check(name: str, fn: Callable[[], str]) -> None:
        t = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as error:  # recorded and reported; the run continues
            detail, ok = f"{type(error).__name__}: {error}".splitlines()[0][:300], False
        checks.append({"name": name, "ok": ok, "detail": detail, "seconds": time.perf_counter() - t})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", file=sys.stderr, flush=True)

    ops = torch.ops.featup

    def opcheck() -> str:
        for dtype in (torch.float32, torch.float64):
            x, f, g = inputs(2, 5, 6, 7, 3, device, dtype)
            torch.library.opcheck(ops.adaptive_conv.default, (x.requires_grad_(True), f.requires_grad_(True)))
            torch.library.opcheck(ops.adaptive_conv_backward.default, (g, x.detach(), f.detach()))
        return "adaptive_conv and adaptive_conv_backward, float32 and float64"

    def gradcheck() -> str:
        x, f, _ = inputs(2, 3, 4, 5, 3, device)
        x.requires_grad_(True)
        f.requires_grad_(True)
        assert torch.autograd.gradcheck(adaptive_conv, (x, f))
        assert torch.autograd.gradgradcheck(adaptive_conv, (x, f))
        return "gradcheck and gradgradcheck, float64, (2,3,4,5) K=3"

    def parity(dtype: torch.dtype) -> Callable[[], str]:
        def run() -> str:
            errors = {}
            for b, c, h, w, k in [(2, 3, 5, 7, 3), (1, 130, 9, 6, 7), (3, 16, 8, 8, 5)]:
                x, f, g = inputs(b, c, h, w, k, device, dtype, seed=k)
                got = op_and_grads(adaptive_conv, x, f, g)
                ref = op_and_grads(adaptive_conv_reference, x, f, g)
                for name, a, e in zip(("forward", "grad_input", "grad_filters"), got, ref, strict=True):
                    assert a.dtype == dtype and a.device == x.device, f"{name}: {a.dtype} on {a.device}"
                    scale = e.double().abs().max().item()
                    tol = TOLERANCE[dtype]
                    torch.testing.assert_close(
                        a,
                        e,
                        rtol=tol["rtol"],
                        atol=tol["atol"] * max(scale, 1.0),
                        msg=lambda m, n=name: f"{n}: {m}",
                    )
                    errors[name] = max(errors.get(name, 0.0), max_err(a, e))
            return ", ".join(f"{n} max err {v:.2g}" for n, v in errors.items())

        return run

    def noncontiguous() -> str:
        x, f, g = inputs(2, 4, 6, 9, 5, device, torch.float32)
        xt = x.transpose(2, 3).contiguous().transpose(2, 3)
        ft = f.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
        gt = g.transpose(0, 1).contiguous().transpose(0, 1)
        assert not (xt.is_contiguous() or ft.is_contiguous() or gt.is_contiguous())
        for a, e in zip(
            op_and_grads(adaptive_conv, xt, ft, gt), op_and_grads(adaptive_conv, x, f, g), strict=True
        ):
            assert torch.equal(a, e), f"non-contiguous differs by {max_err(a, e)}"
        return "transposed input, filters, grad_out: bitwise the contiguous result"

    def autocast_bf16() -> str:
        x, f, g = inputs(2, 8, 7, 5, 3, device, torch.float32)
        x.requires_grad_(True)
        f.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = adaptive_conv(x, f)
        assert out.dtype == torch.bfloat16, f"autocast output is {out.dtype}, expected bfloat16"
        gx, gf = torch.autograd.grad(out, (x, f), g.bfloat16())
        assert gx.dtype == gf.dtype == torch.float32, "gradients must come back in the arguments' dtype"
        ref = op_and_grads(adaptive_conv_reference, x.bfloat16(), f.bfloat16(), g.bfloat16())
        tol = TOLERANCE[torch.bfloat16]
        for name, a, e in zip(("forward", "grad_input", "grad_filters"), (out, gx, gf), ref, strict=True):
            scale = e.double().abs().max().item()
            torch.testing.assert_close(
                a.float(),
                e.float(),
                rtol=tol["rtol"],
                atol=tol["atol"] * max(scale, 1),
                msg=lambda m, n=name: f"{n}: {m}",
            )
        return "float32 arguments under autocast(bfloat16): bfloat16 output, float32 gradients, parity"

    def emulated_threads() -> str:
        errors = []
        for b, c, h, w, k in [(3, 130, 5, 7, 9), (3, 3, 7, 5, 1)]:
            x, f, g = inputs(b, c, h, w, k, device)
            got = (ops.adaptive_conv(x, f), *ops.adaptive_conv_backward(g, x, f))
            cx, cf, cg = x.cpu(), f.cpu(), g.cpu()
            emu = (
                ops._emulate_cuda_threads_forward(cx, cf),
                *ops._emulate_cuda_threads_backward(cg, cx, cf),
            )
            for a, e in zip(got, emu, strict=True):
                torch.testing.assert_close(a.cpu(), e, rtol=1e-12, atol=1e-12)
                errors.append(max_err(a.cpu(), e))
        return f"float64, K=9 C=130 and K=1 C=3: max err {max(errors):.2g}"

    def beyond_grid_cap(c: int) -> Callable[[], str]:
        def run() -> str:
            threads, cap = bk_launch()
            h, w, k = 256, 256, 3
            n = c * h * w
            gen = torch.Generator(device).manual_seed(0)  # drawn on the device (1.7 GB float32 at c = 2100)
            x = torch.randn(1, c, h + k - 1, w + k - 1, generator=gen, device=device)
            f = torch.softmax(torch.randn(1, h, w, k * k, generator=gen, device=device), -1).view(
                1, h, w, k, k
            )
            g = torch.randn(1, c, h, w, generator=gen, device=device)
            with torch.no_grad():
                err = (adaptive_conv(x, f) - bk.shifted_madd(x, f)).abs().max().item()
                gx, gf = ops.adaptive_conv_backward(g, x, f)
            assert err < 1e-4, f"forward max err {err} against the shifted route"
            # the last channels of the input gradient lie beyond the grid: written in the loop's second round
            tail = gx[:, -8:]
            ref_tail = op_and_grads(adaptive_conv_reference, x[:, -8:], f, g[:, -8:])[1]
            torch.testing.assert_close(tail, ref_tail, rtol=1e-4, atol=1e-4)
            assert torch.isfinite(gf).all()
            beyond = "beyond" if n > threads * cap else "within (code path only)"
            return f"{n} output elements, {beyond} the grid of {threads * cap} threads: forward err {err:.2g}"

        return run

    check("opcheck", opcheck)
    check("gradcheck float64", gradcheck)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check(f"parity {str(dtype).removeprefix('torch.')}", parity(dtype))
    check("non-contiguous", noncontiguous)
    check("autocast bfloat16", autocast_bf16)
    check("device vs CUDA thread bodies on CPU", emulated_threads)
    if device.type == "cuda" and not quick:  # 2100 * 256 * 256 outputs > 256 * 65535 * 8 threads
        check("grid-stride beyond the grid cap", beyond_grid_cap(2100))
    else:  # the same check on a small tensor, so the code never rots
        check("grid-stride check (small: code path only)", beyond_grid_cap(9))
    return checks


def bk_launch() -> tuple[int, int]:
    """(threads per block, block cap) of the CUDA launch."""
    from featup.kernels import _C

    threads, cap = _C._cuda_launch_config(2**62)
    return int(threads), int(cap)


# ---- 2. Table 6 -------------------------------------------------------------------------------------------


def measure_route(name: str, shape: bk.Shape, device: torch.device, budget: float, min_runs: int) -> dict:
    """Forward and forward + backward median ms and peak MB of one route on one shape (its tensors die here)."""
    fn = bk.METHODS[name]
    x, f, g = (t.to(device) for t in shape.inputs())
    xg, fg = x.clone().requires_grad_(True), f.clone().requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            fn(x, f)

    def forward_backward() -> None:
        torch.autograd.grad(fn(xg, fg), (xg, fg), g)

    forward_backward()  # warm-up outside the memory measurement
    return {
        "forward_ms": median_ms(forward, device, budget, min_runs),
        "fwdbwd_ms": median_ms(forward_backward, device, budget, min_runs),
        "forward_peak_mb": peak_mb(forward, device),
        "fwdbwd_peak_mb": peak_mb(forward_backward, device),
    }


def table6(device: torch.device, quick: bool, budget: float, max_unfold_mb: float) -> list[dict[str, Any]]:
    shapes = bk.scaled_shapes(max_unfold_mb)
    if quick:  # the smaller shapes, each once (scaled batches can make two paper shapes the same)
        shapes = [s for s in shapes if s.batch * s.c * s.h * s.w <= 2**19]
        shapes = [s for i, s in enumerate(shapes) if s.label not in {t.label for t in shapes[:i]}]
    min_runs = 1 if quick else 3
    rows = []
    for shape in shapes:
        methods: dict[str, dict[str, Any]] = {}
        for name in ("ours", "unfold", "shifted"):
            print(f"  table 6 {shape.label} {name} ...", file=sys.stderr, flush=True)
            try:
                methods[name] = measure_route(name, shape, device, budget, min_runs)
            except Exception as error:  # out of memory is a result, anything else a failure
                if not is_oom(error):
                    raise
                methods[name] = {"error": "out of memory"}
            free(device)
        rows.append(
            {"label": shape.label, "paper_batch": shape.paper_batch, **vars(shape), "methods": methods}
        )
    return rows


# ---- 3. the JBU at 448 px ---------------------------------------------------------------------------------


def jbu_forward(device: torch.device, quick: bool, budget: float) -> dict[str, Any]:
    from featup.core import JBUStack

    size, channels = (112, 64) if quick else (448, 384)
    torch.manual_seed(0)
    up = JBUStack().to(device).eval()
    feats = torch.randn(1, channels, size // 16, size // 16, device=device)
    image = torch.rand(1, 3, size, size, device=device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return up(feats, image)

    out = forward()
    assert out.shape == (1, channels, size, size), out.shape
    result = {
        "size": size,
        "channels": channels,
        "ratio": 16,
        "forward_ms": median_ms(forward, device, budget),
    }
    result["peak_mb"] = peak_mb(forward, device)
    # Mixed precision: the fused op's autocast registration on this device, through the JBU.
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with FusedOpRecorder() as recorder:
            out = forward()
        assert recorder.calls, "the JBU did not call featup::adaptive_conv under autocast"
        assert torch.isfinite(out).all(), "non-finite JBU output under bfloat16 autocast"
        result["autocast_bf16_fused_calls"] = recorder.calls
        # In the forward, adaptive_conv_backward is the JBU's range kernel (pairwise key similarities); its
        # distances cancel badly in 16-bit, so it should run in float32 (issue 13, item 12). Reported, not failed:
        # the JBU's precision handling belongs to featup.core.
        range_dtypes = sorted({c.split("(")[1].split(",")[0] for c in recorder.calls if "backward" in c})
        result["autocast_bf16_range_kernel_dtypes"] = range_dtypes
        result["forward_ms_autocast_bf16"] = median_ms(forward, device, budget)
        result["peak_mb_autocast_bf16"] = peak_mb(forward, device)
    return result


class FusedOpRecorder(TorchDispatchMode):
    """Records every featup op call below autocast: op name and argument dtypes, e.g. to see what autocast did."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "featup":
            dtypes = ",".join(
                str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)
            )
            self.calls.append(f"{func.__name__}({dtypes})")
        return func(*args, **(kwargs or {}))


# ---- 4. training and fitting ------------------------------------------------------------------------------


class ViTFeatures(torch.nn.Module):
    """A timm ViT-S/16 (random init) as a FeatUp backbone: (B,3,H,W) -> (B,384,H/16,W/16)."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(image)[:, self.vit.num_prefix_tokens :]
        h, w = image.shape[-2] // 16, image.shape[-1] // 16
        return tokens.transpose(1, 2).reshape(image.shape[0], -1, h, w)


def photos(n: int, size: int) -> torch.Tensor:
    """``n`` RGB photos from scikit-image's data, resized to size x size, in [0, 1]."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    images = []
    for i in range(n):
        img = torch.from_numpy(getattr(data, names[i % len(names)])()[..., :3].copy()).permute(2, 0, 1)
        img = img[None].float() / 255
        images.append(
            torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
        )
    return torch.cat(images).clamp(0, 1)


def step_timer(device: torch.device, times: list[float]) -> Callable[[int, dict], None]:
    last = [time.perf_counter()]

    def callback(step: int, logs: dict) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    return callback


def training(device: torch.device, quick: bool) -> dict[str, Any]:
    from featup.core import fit_implicit, train_jbu

    size, batch_size = (64, 2) if quick else (224, 4)
    jbu_steps = 3 if quick else 30
    implicit_steps = 3 if quick else 30
    warmup = 1 if quick else 5
    torch.manual_seed(0)
    backbone = ViTFeatures().to(device).eval()
    images = photos(8, size)
    result: dict[str, Any] = {"size": size, "backbone": "ViT-S/16 (timm, random init)"}
    for precision in ("float32", "bfloat16"):
        times: list[float] = []
        train_jbu(
            backbone, images, steps=jbu_steps, batch_size=batch_size, progress=False, device=device,
            precision=precision, callback=step_timer(device, times), seed=0,
        )  # fmt: skip
        per_step = statistics.median(times[warmup:])
        result[f"train_jbu_{precision}"] = {
            "steps": jbu_steps, "timed_steps": len(times) - warmup, "s_per_step": per_step,
            "steps_per_s": 1 / per_step, "batch_size": batch_size,
        }  # fmt: skip
        free(device)
    times = []
    fit_implicit(
        backbone, images[:1], steps=implicit_steps, n_jitters=4 if quick else 10, progress=False, device=device, callback=step_timer(device, times),
        seed=0,
    )  # fmt: skip
    per_step = statistics.median(times[warmup:])
    result["fit_implicit"] = {
        "timed_steps": len(times) - warmup, "n_jitters": 4 if quick else 10, "s_per_step": per_step, "seconds_2000_steps": 2000 * per_step,
        "paper": PAPER_FIT_IMPLICIT,
    }  # fmt: skip
    return result


# ---- report -----------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    mem = (
        "CUDA max_memory_allocated (total)" if m["device"].startswith("cuda") else "CPU RSS peak above start"
    )
    lines = [
        f"# FeatUp GPU check ({'quick, ' if r['quick'] else ''}{m['device']}: {m['device_name']})",
        "",
        f"torch {m['torch']}, featup-kernels CUDA build: {m['kernels']['cuda']}; {r['seconds']:.0f} s in total. "
        f"Peak memory: {mem}.",
        "",
        "## Kernel tests",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [
        f"| {c['name']} | {'ok' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in r.get("kernel_checks", [])
    ]
    if "table6" in r:
        lines += [
            "",
            "## Table 6 shapes",
            "",
            "| shape BxHxWxCxK (paper B) | method | fwd ms | fwd+bwd ms | peak MB fwd | peak MB fwd+bwd "
            "| fwd+bwd speedup of ours |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in r["table6"]:
            ours = row["methods"].get("ours", {})
            for name, v in row["methods"].items():
                if "error" in v:
                    lines.append(f"| {row['label']} ({row['paper_batch']}) | {name} | {v['error']} | | | | |")
                    continue
                speedup = v["fwdbwd_ms"] / ours["fwdbwd_ms"] if "fwdbwd_ms" in ours else "n/a"
                lines.append(
                    f"| {row['label']} ({row['paper_batch']}) | {name} | {v['forward_ms']:.2f} | {v['fwdbwd_ms']:.2f} "
                    f"| {v['forward_peak_mb']:.1f} | {v['fwdbwd_peak_mb']:.1f} | {fmt(speedup, '.1f')}x |"
                )
    if "jbu" in r:
        j = r["jbu"]
        lines += [
            "",
            f"## JBU (featup.core.JBUStack) forward, 16x to {j['size']} px, {j['channels']} channels",
            "",
            "| upsampler | forward ms | peak GB | source |",
            "|---|---:|---:|---|",
            f"| JBUStack (this repo) | {j['forward_ms']:.1f} | {j['peak_mb'] / 1024:.2f} | measured here |",
        ]
        if "forward_ms_autocast_bf16" in j:
            calls = sorted(set(j["autocast_bf16_fused_calls"]))
            lines.append(
                f"| JBUStack under autocast bfloat16 | {j['forward_ms_autocast_bf16']:.1f} "
                f"| {j['peak_mb_autocast_bf16'] / 1024:.2f} | measured here; fused op calls: {', '.join(calls)} |"
            )
            dtypes = j["autocast_bf16_range_kernel_dtypes"]
            note = "" if dtypes == ["float32"] else " (expected float32: issue 13, item 12)"
        lines += [
            f"| {k} | {v['forward_ms']} | {v['peak_gb']} | published (448 px, 384 ch) |"
            for k, v in PUBLISHED.items()
        ]
        if "forward_ms_autocast_bf16" in j:
            lines += [
                "",
                f"Under bfloat16 autocast the JBU's range kernel ran in: {', '.join(dtypes) or 'n/a'}{note}.",
            ]
    if "training" in r:
        t = r["training"]
        lines += [
            "",
            f"## Training at {t['size']} px ({t['backbone']})",
            "",
            "| run | steps/s | s/step | note |",
            "|---|---:|---:|---|",
        ]
        for precision in ("float32", "bfloat16"):
            v = t[f"train_jbu_{precision}"]
            lines.append(
                f"| train_jbu precision={precision} | {v['steps_per_s']:.2f} | {v['s_per_step']:.3f} "
                f"| batch {v['batch_size']}, median of {v['timed_steps']} steps |"
            )
        fi = t["fit_implicit"]
        lines.append(
            f"| fit_implicit | {1 / fi['s_per_step']:.2f} | {fi['s_per_step']:.3f} "
            f"| 2000 steps: {fi['seconds_2000_steps']:.0f} s (extrapolated; {fi['paper']}) |"
        )
    if r["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (the CI smoke run)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json/.md")
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per timing")
    parser.add_argument(
        "--max-unfold-mb", type=float, default=None, help="Table 6 batch cap (unfold patches)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False (use --device cpu)")
    if device.type == "cpu" and any(os.environ.get(k) != v for k, v in bk.MALLOC_ENV.items()):
        # Peak CPU memory needs freed tensors to leave the process: re-run with glibc's mmap threshold lowered.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **bk.MALLOC_ENV})
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    max_unfold_mb = args.max_unfold_mb or (
        32.0 if args.quick else (16384.0 if device.type == "cuda" else 256.0)
    )

    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else bk.machine_info()["cpu"]
    result: dict[str, Any] = {
        "quick": args.quick,
        "machine": {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "kernels": build_info(),
        },
        "published": PUBLISHED,
        "errors": {},
    }
    sections = [
        ("kernel_checks", lambda: kernel_checks(device, args.quick)),
        ("table6", lambda: table6(device, args.quick, budget, max_unfold_mb)),
        ("jbu", lambda: jbu_forward(device, args.quick, budget)),
        ("training", lambda: training(device, args.quick)),
    ]
    for key, run in sections:
        print(f"{key} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            result[key] = run()
        except Exception as error:  # a broken section must not hide the others
            traceback.print_exc()
            result["errors"][key] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        result.setdefault("section_seconds", {})[key] = time.perf_counter() - t
        free(device)
    result["seconds"] = time.perf_counter() - start
    failed = [c["name"] for c in result.get("kernel_checks", []) if not c["ok"]]
    result["ok"] = not failed and not result["errors"]
    result["markdown"] = markdown(result)
    print(result["markdown"])
    args.out.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out / "gpu_check.json", json.dumps(result, indent=2)),
                       (args.out / "gpu_check.md", result["markdown"] + "\n")):  # fmt: skip
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # never a half-written result
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
