"""Time and peak memory per image of every upsampler on the CPU, beside a plain-PyTorch unfold JBU.

Case: one image, 384-channel 14 x 14 features (a ViT-S/16 at 224 px) upsampled to 56, 112, 224, 448 and
896 px, forward pass under ``torch.inference_mode()``. Plus ``fit_implicit`` steps per second when
``featup.core.training.fit_implicit`` is importable.

Method
- Every (upsampler, size) case runs in its own fresh subprocess, so one case's allocations and allocator
  caches never leak into another's numbers.
- Peak memory: in the subprocess, after building the module and inputs and after a small warm-up call
  (thread pools, lazily initialised kernels), the kernel's peak-RSS counter is reset
  (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``); the case's peak is ``VmHWM`` after one forward
  minus ``VmRSS`` before it: the extra resident memory the forward needed at its worst moment, inputs
  excluded, output included. Large tensors are ``mmap``-ed by glibc and returned on free, so RSS follows
  live tensor memory. Where clear_refs is not writable the script falls back to ``ru_maxrss`` minus the
  RSS before (an upper bound) and says so.
- Time: median of ``--repeats`` forwards after the measured one (at most ``--budget`` seconds of repeats).
- The unfold JBU ("jbu_unfold") is the same stack with the same weights computed the naive way: ``F.unfold``
  patch tensors for both the range kernel and the feature aggregation (C * 49 values per output pixel). Its
  output is checked against ``JBUStack`` before timing. Cases whose predicted memory exceeds ``--max-gb`` are
  skipped and reported as such.

Run:  /work/venv/bin/python tools/bench_upsamplers.py [--sizes 56 112 224 448 896] [--json out.json]
Prints a markdown table; writes JSON (default tools/results/bench_upsamplers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SIZES = (56, 112, 224, 448, 896)
METHODS = (
    "jbu",
    "jbu_unfold",
    "bilinear",
    "bicubic",
    "nearest",
    "jbu_classic",
    "resize_conv",
    "carafe",
    "sapa",
)
LR_SIZE = 14
FEAT_DIM = 384


# ----------------------------------------------------------------------------------------- the unfold JBU


def unfold_jbu_forward(stack, lr_feats, image, size):
    """``JBUStack.forward`` with ``F.unfold`` patches instead of the adaptive convolution (same math)."""
    import torch
    import torch.nn.functional as F

    from featup.core.jbu import pad2d, pool_guidance, resize, spatial_gaussian, stage_sizes

    guidance = stack.guidance(image)
    stages = stack.stages
    x = lr_feats
    for k, stage_size in enumerate(stage_sizes(lr_feats.shape[-2:], size)):
        stage = stages[min(k, len(stages) - 1)]
        g = pool_guidance(guidance, stage_size)
        b, _, h, w = g.shape
        r, d = stage.radius, stage.diameter
        keys = stage.range_proj(g)
        key_patches = F.unfold(pad2d(keys, r, stage.pad_mode), d).view(b, keys.shape[1], d * d, h, w)
        temp = stage.range_temp.exp().clamp(1e-4, 1e4)
        if stage.range_kernel == "distance":
            kernel = torch.softmax(-temp * (key_patches - keys[:, :, None]).square().sum(1), dim=1)
        else:
            kernel = torch.softmax(temp * (key_patches * keys[:, :, None]).sum(1), dim=1)
        kernel = kernel * spatial_gaussian(r, stage.sigma_spatial).view(1, -1, 1, 1)
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        correction = 0.1 * stage.kernel_correction(kernel, g) if stage.fixup_proj is not None else 0
        if getattr(stage, "gate", None) is not None:  # safe start: delta + gate * (kernel - delta)
            delta = torch.zeros(d * d, dtype=kernel.dtype).view(1, -1, 1, 1)
            delta[:, d * d // 2] = 1.0
            kernel = delta + stage.gate * (kernel - delta)
        kernel = kernel + correction
        src = pad2d(resize(x, (h, w), stage.resize_mode), r, stage.pad_mode)
        patches = F.unfold(src, d).view(b, x.shape[1], d * d, h, w)
        x = (patches * kernel[:, None]).sum(2)  # (torch.einsum is far slower here: tiny batched matmuls)
    if stack.fixup_proj is not None:
        x = x + stack.proj_scale * stack.fixup_proj(x)
    return x


def predicted_gb(method: str, size: int) -> float:
    """Rough peak for the skip rule: unfold JBU holds the patch tensor and its product with the kernel."""
    fmap = FEAT_DIM * size * size * 4 / 2**30
    if method == "jbu_unfold":
        return 2 * 49 * fmap
    if method in ("carafe", "sapa"):
        return 5 * fmap
    return 4 * fmap


# ----------------------------------------------------------------------------------------- one case (child)


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(method: str, seed: int = 0):
    import torch

    from featup.core import JBUStack, create_upsampler

    torch.manual_seed(seed)
    if method in ("jbu", "jbu_unfold"):
        stack = JBUStack().eval()  # encoder-agnostic, the layout users train; deterministic random weights
        with torch.no_grad():
            for stage in stack.stages:
                stage.range_temp.fill_(0.5)
        if method == "jbu":
            return stack
        return lambda feats, image, size: unfold_jbu_forward(stack, feats, image, size)
    return create_upsampler(method, feat_dim=FEAT_DIM)


def run_case(method: str, size: int, repeats: int, budget: float, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    up = build(method)
    with torch.inference_mode():
        feats = torch.randn(1, FEAT_DIM, LR_SIZE, LR_SIZE, generator=gen)
        image = torch.rand(1, 3, size, size, generator=gen)
        small = torch.rand(1, 3, 28, 28, generator=gen)
        up(feats, small, (28, 28))  # warm-up: thread pools, lazy kernel init
        exact = _reset_peak()
        rss0 = _status_kb("VmRSS") or 0
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = up(feats, image, (size, size))
        first = time.perf_counter() - t0
        if exact:
            peak_kb = (_status_kb("VmHWM") or 0) - rss0
        else:
            peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, maxrss0) - rss0
        assert out.shape == (1, FEAT_DIM, size, size)
        del out
        times = []
        spent = 0.0
        for _ in range(repeats):
            if spent > budget:
                break
            t0 = time.perf_counter()
            up(feats, image, (size, size))
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
    return {
        "method": method,
        "size": size,
        "time_ms": 1000 * statistics.median(times or [first]),
        "runs": len(times) or 1,
        "peak_mb": peak_kb / 1024,
        "peak_method": "VmHWM-reset" if exact else "ru_maxrss (upper bound)",
    }


def check_unfold_matches(threads: int) -> float:
    """Max abs difference between JBUStack and the unfold JBU at 56 px (they must agree)."""
    import torch

    torch.set_num_threads(threads)
    stack = build("jbu")
    unfold = build("jbu_unfold")
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        feats = torch.randn(1, FEAT_DIM, LR_SIZE, LR_SIZE, generator=gen)
        image = torch.rand(1, 3, 56, 56, generator=gen)
        return float((stack(feats, image) - unfold(feats, image, (56, 56))).abs().max())


def fit_implicit_rate(threads: int, steps: tuple[int, int] = (3, 13)) -> dict:
    """fit_implicit steps/s on a 224 px image with a fixed random 384-channel stride-16 patch embedding."""
    import torch

    torch.set_num_threads(threads)
    try:
        from featup.core.training import fit_implicit
    except ImportError as exc:
        return {"available": False, "message": f"fit_implicit not importable ({exc}); skipped"}
    torch.manual_seed(0)
    backbone = torch.nn.Conv2d(3, FEAT_DIM, 16, stride=16).eval().requires_grad_(False)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    walls = []
    for n in steps:
        t0 = time.perf_counter()
        fit_implicit(backbone, image, steps=n, progress=False)
        walls.append(time.perf_counter() - t0)
    marginal = (walls[1] - walls[0]) / (steps[1] - steps[0])  # setup cost cancels (if the load is steady)
    return {
        "available": True,
        "steps_per_s": steps[1] / walls[1],  # conservative: the longer run, setup included
        "ms_per_step": 1000 * walls[1] / steps[1],
        "marginal_ms_per_step": 1000 * marginal,
        "walls_s": dict(zip(map(str, steps), walls)),
        "image": 224,
        "feat_dim": FEAT_DIM,
    }


# ----------------------------------------------------------------------------------------- driver (parent)


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {res.returncode}: {' | '.join(tail)}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def kernel_backend() -> str:
    import featup.kernels as k

    info = getattr(k, "build_info", None)
    if k.adaptive_conv is getattr(k, "adaptive_conv_reference", None):
        return "pure-PyTorch reference (unfold) adaptive_conv"
    if callable(info):
        try:
            return f"compiled adaptive_conv ({info()})"
        except Exception as exc:  # build_info is informative only
            return f"compiled adaptive_conv (build_info failed: {exc})"
    return "compiled adaptive_conv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timed repeats per case at most")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=8.0, help="skip cases predicted to need more memory")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-implicit", action="store_true")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_upsamplers.json")
    ap.add_argument("--case", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--implicit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:  # child process: one measurement, one JSON line
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats, args.budget, args.threads)))
        return
    if args.check:
        print(json.dumps({"max_abs_diff": check_unfold_matches(args.threads)}))
        return
    if args.implicit:
        print(json.dumps(fit_implicit_rate(args.threads)))
        return

    import torch

    backend = kernel_backend()
    load_start = os.getloadavg()
    common = ["--repeats", str(args.repeats), "--budget", str(args.budget), "--threads", str(args.threads)]
    check = _child(["--check", *common], args.timeout)
    print(f"# Upsampler benchmark (CPU, {args.threads} thread(s), torch {torch.__version__})\n")
    print(f"adaptive_conv backend: {backend}")
    print(f"JBUStack vs unfold JBU at 56 px, max |diff|: {check.get('max_abs_diff', check.get('error'))}")
    print(
        f"load average at start: {load_start[0]:.1f} on {os.cpu_count()} cores "
        "(times are inflated under load)\n"
    )
    results = []
    for size in args.sizes:
        for method in args.methods:
            need = predicted_gb(method, size)
            if need > args.max_gb:
                row = {
                    "method": method,
                    "size": size,
                    "skipped": f"predicted {need:.1f} GB > --max-gb {args.max_gb}",
                }
            else:
                row = {
                    "method": method,
                    "size": size,
                    **_child(["--case", method, str(size), *common], args.timeout),
                }
            results.append(row)
            print(f"  {method:>12} {size:>4}px: {_fmt_row(row)}", file=sys.stderr, flush=True)

    implicit = (
        None if args.no_implicit else _child(["--implicit", "--threads", str(args.threads)], args.timeout)
    )

    by = {(r["method"], r["size"]): r for r in results}
    print("| upsampler | " + " | ".join(f"{s} px" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for method in args.methods:
        cells = [_fmt_row(by[(method, s)]) for s in args.sizes]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nEach cell: forward time per image (ms) / peak extra memory (MB), 384 x 14 x 14 features.\n")

    ratios = {}
    for s in args.sizes:
        a, b = by.get(("jbu", s), {}), by.get(("jbu_unfold", s), {})
        if "time_ms" in a and "time_ms" in b:
            ratios[s] = {
                "speedup": b["time_ms"] / a["time_ms"],
                "memory_ratio": b["peak_mb"] / max(a["peak_mb"], 1e-9),
            }
            print(
                f"- {s} px: JBUStack is {ratios[s]['speedup']:.1f}x faster than the unfold JBU and uses "
                f"1/{ratios[s]['memory_ratio']:.1f} of its peak memory"
            )
    if 224 in ratios:
        ok = ratios[224]["speedup"] >= 3 and ratios[224]["memory_ratio"] >= 5
        print(f"- target at 16x (224 px): >= 3x faster and <= 1/5 memory: {'MET' if ok else 'NOT MET'}")
    if implicit is not None:
        if implicit.get("available"):
            print(
                f"- fit_implicit (224 px, {FEAT_DIM} ch, Table 7 defaults): "
                f"{implicit['steps_per_s']:.3f} steps/s "
                f"({implicit['ms_per_step']:.0f} ms/step incl. setup; marginal "
                f"{implicit['marginal_ms_per_step']:.0f} ms/step)"
            )
        else:
            print(f"- fit_implicit: {implicit.get('message', implicit.get('error'))}")

    payload = {
        "torch": torch.__version__,
        "threads": args.threads,
        "backend": backend,
        "feat_dim": FEAT_DIM,
        "lr_size": LR_SIZE,
        "unfold_check_max_abs_diff": check.get("max_abs_diff"),
        "results": results,
        "jbu_vs_unfold": {str(k): v for k, v in ratios.items()},
        "fit_implicit": implicit,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.json)
    print(f"\nJSON: {args.json}")


def _fmt_row(row: dict) -> str:
    if "skipped" in row:
        return "skipped"
    if "error" in row:
        return "error"
    return f"{row['time_ms']:.1f} / {row['peak_mb']:.0f}"


if __name__ == "__main__":
    main()
