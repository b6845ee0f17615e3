"""Benchmark featup.kernels.adaptive_conv on the CPU against the plain-PyTorch routes (the paper's Table 6).

Methods, all computing ``out[b,c,h,w] = sum_ij filters[b,h,w,i,j] * input[b,c,h+i,w+j]``:
  - ours:     featup.kernels.adaptive_conv (the compiled op)
  - unfold:   F.unfold + einsum, the standard PyTorch route (materializes every K x K patch)
  - shifted:  a shifted multiply-add over the K*K offsets (in-place addcmul; the best plain-PyTorch route)
  - naive:    a Python loop over output pixels (smallest shape only)

For each shape and method: forward ms, backward ms (both gradients), and peak memory: resident memory above
the inputs during the forward, and during forward + backward. Times are medians of repeated runs, wall clock,
at torch's default thread count. Memory is measured in a child process whose large allocations go straight to
mmap (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the process and the peak resident set (reset through
/proc/self/clear_refs) is the peak of live tensors, whatever allocates them (including scratch inside ops).

The physical floor of a shape, measured in the same run: the larger of
  - a memory floor: bytes of input + filters + output at the bandwidth torch's copy_ reaches on 256 MB, and
  - a compute floor: K*K*B*C*H*W multiply-adds at the rate torch.mm reaches on a large square matmul,
and "x floor" is our forward time divided by it.

The memory lower bound of a shape ("required MB"): what any implementation must hold at the peak of forward +
backward, above the inputs: the output (B*C*H*W), the input gradient (B*C*(H+K-1)*(W+K-1)) and the filter
gradient (B*H*W*K*K), all returned and alive together when the backward finishes. Each method's fwd+bwd peak
is also given as a multiple of it. The filter gradient alone is 1/C of unfold's patch tensor (B*C*K*K*H*W),
and unfold peaks at about two patch tensors, so where unfold's peak is under 10x the required bytes (C = 3),
a peak of 1/10 of unfold's is out of reach for any implementation.

The paper's batch sizes are scaled down to the largest power of two whose unfold patch tensor fits in
--max-unfold-mb (CPU memory is shared); the table says which batch ran.

    python tools/bench_kernels.py --json bench-results/bench_kernels.json
    python tools/bench_kernels.py --ours-only --json bench-results/bench_kernels_ours.json   # quick: our op only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from featup.kernels import adaptive_conv, build_info

__all__ = ["PAPER_SHAPES", "main"]

# (B, H, W, C, K) of the paper's Table 6 ("F" there is the kernel size K).
PAPER_SHAPES: list[tuple[int, int, int, int, int]] = [
    (1, 14, 14, 2048, 5),
    (1, 512, 512, 3, 5),
    (16, 32, 32, 2048, 5),
    (32, 512, 512, 3, 5),
    (64, 14, 14, 2048, 5),
    (64, 224, 224, 3, 5),
    (64, 64, 64, 16, 5),
    (64, 64, 64, 16, 7),
]
BYTES = 4  # float32


# ---- the methods ---------------------------------------------------------------------------------------


def unfold_einsum(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    _, h, w, k, _ = f.shape
    patches = F.unfold(x, kernel_size=k).view(b, c, k * k, h * w)
    weights = f.reshape(b, h * w, k * k).transpose(1, 2)
    return torch.einsum("bckp,bkp->bcp", patches, weights).view(b, c, h, w)


def shifted_madd(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    _, h, w, k, _ = f.shape
    out = x.new_zeros(b, c, h, w)
    for i in range(k):
        for j in range(k):
            out.addcmul_(x[:, :, i : i + h, j : j + w], f[:, None, :, :, i, j])
    return out


def naive_loop(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    _, h, w, k, _ = f.shape
    rows = []
    for hh in range(h):
        cols = []
        for ww in range(w):
            window = x[:, :, hh : hh + k, ww : ww + k]  # (B, C, K, K)
            cols.append((window * f[:, None, hh, ww]).sum(dim=(-2, -1)))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ours": adaptive_conv,
    "unfold": unfold_einsum,
    "shifted": shifted_madd,
    "naive": naive_loop,
}


# ---- shapes -------------------------------------------------------------------------------------------


@dataclass
class Shape:
    paper_batch: int
    batch: int
    h: int
    w: int
    c: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.h}x{self.w}x{self.c}x{self.k}"

    @property
    def fmas(self) -> int:
        return self.k * self.k * self.batch * self.c * self.h * self.w

    @property
    def io_bytes(self) -> int:
        b, h, w, c, k = self.batch, self.h, self.w, self.c, self.k
        return BYTES * (b * c * (h + k - 1) * (w + k - 1) + b * h * w * k * k + b * c * h * w)

    @property
    def required_bytes(self) -> int:
        """Output + input gradient + filter gradient: what any forward + backward must hold at its peak."""
        b, h, w, c, k = self.batch, self.h, self.w, self.c, self.k
        return BYTES * (b * c * h * w + b * c * (h + k - 1) * (w + k - 1) + b * h * w * k * k)

    def inputs(self, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        b, h, w, c, k = self.batch, self.h, self.w, self.c, self.k
        x = torch.randn(b, c, h + k - 1, w + k - 1, generator=gen).requires_grad_(requires_grad)
        f = torch.softmax(torch.randn(b, h, w, k * k, generator=gen), -1).view(b, h, w, k, k)
        f.requires_grad_(requires_grad)
        g = torch.randn(b, c, h, w, generator=gen)
        return x, f, g


def scaled_shapes(max_unfold_mb: float) -> list[Shape]:
    """The paper's shapes with the batch cut to the largest power of two whose unfold patches fit."""
    shapes = []
    for b, h, w, c, k in PAPER_SHAPES:
        per_item = BYTES * c * k * k * h * w / 2**20
        batch = b
        while batch > 1 and batch * per_item > max_unfold_mb:
            batch //= 2
        shapes.append(Shape(b, batch, h, w, c, k))
    return shapes


def methods_for(shape: Shape, smallest: Shape) -> list[str]:
    return ["ours", "unfold", "shifted"] + (["naive"] if shape is smallest else [])


# ---- timing -------------------------------------------------------------------------------------------


def median_ms(run: Callable[[], float], budget_s: float, min_runs: int = 3, max_runs: int = 25) -> float:
    """Median of ``run()`` (which returns seconds) after one warm-up, within about ``budget_s``."""
    run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        times.append(run())
    return 1e3 * statistics.median(times)


def time_method(name: str, shape: Shape, budget_s: float) -> dict[str, float]:
    fn = METHODS[name]
    x, f, g = shape.inputs()

    def forward() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            fn(x, f)
            return time.perf_counter() - t

    xg, fg = x.clone().requires_grad_(True), f.clone().requires_grad_(True)

    def backward() -> float:
        out = fn(xg, fg)
        t = time.perf_counter()
        torch.autograd.grad(out, (xg, fg), g)
        return time.perf_counter() - t

    return {"forward_ms": median_ms(forward, budget_s), "backward_ms": median_ms(backward, budget_s)}


def time_ours_cpu(shape: Shape, budget_s: float) -> dict[str, float]:
    """Our forward and backward op alone: median wall and process (CPU, all threads) milliseconds.

    CPU time shows what wall time hides on shared cores: threads spinning at barriers while another is
    preempted. The backward is ``adaptive_conv_backward`` itself (both gradients), without autograd.
    """
    x, f, g = shape.inputs()
    ops = torch.ops.featup
    result: dict[str, float] = {}
    for name, call in (
        ("forward", lambda: ops.adaptive_conv(x, f)),
        ("backward", lambda: ops.adaptive_conv_backward(g, x, f)),
    ):
        call()
        wall: list[float] = []
        cpu: list[float] = []
        start = time.perf_counter()
        while len(wall) < 25 and (len(wall) < 5 or time.perf_counter() - start < budget_s):
            t, c = time.perf_counter(), time.process_time()
            call()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - t)
        result[f"{name}_ms"] = 1e3 * statistics.median(wall)
        result[f"{name}_cpu_ms"] = 1e3 * statistics.median(cpu)
    result["backward_over_forward"] = result["backward_ms"] / result["forward_ms"]
    result["backward_over_forward_cpu"] = result["backward_cpu_ms"] / result["forward_cpu_ms"]
    return result


def run_ours_only(args: argparse.Namespace) -> dict[str, object]:
    """The quick mode: our op only, forward and backward, wall and CPU time, no other methods or memory."""
    shapes = scaled_shapes(args.max_unfold_mb)
    if args.quick:
        shapes = [s for s in shapes if s.c * s.h * s.w * s.batch <= 2**21]
    rows = []
    for shape in shapes:
        print(f"  {shape.label} ours ...", file=sys.stderr, flush=True)
        rows.append({"label": shape.label, **asdict(shape), **time_ours_cpu(shape, args.budget)})
    lines = [
        f"threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f}",
        "",
        "| shape (BxHxWxCxK) | fwd ms | fwd CPU ms | bwd ms | bwd CPU ms | bwd/fwd | bwd/fwd CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['forward_ms']:.2f} | {r['forward_cpu_ms']:.2f} | {r['backward_ms']:.2f} "
            f"| {r['backward_cpu_ms']:.2f} | {r['backward_over_forward']:.1f} "
            f"| {r['backward_over_forward_cpu']:.1f} |"
        )
    return {"machine": machine_info(), "mode": "ours-only", "shapes": rows, "markdown": "\n".join(lines)}


def machine_rates(budget_s: float) -> dict[str, float]:
    """torch.mm's multiply-add rate on a large square matmul, and torch's copy bandwidth on 256 MB."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)

    def mm() -> float:
        t = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t

    mm_ms = median_ms(mm, budget_s)
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)

    def copy() -> float:
        t = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t

    copy_ms = median_ms(copy, budget_s)
    return {
        "matmul_n": n,
        "matmul_gfma_per_s": n**3 / (mm_ms * 1e-3) / 1e9,
        "copy_mb": src.numel() * BYTES / 2**20,
        "copy_gb_per_s": 2 * src.numel() * BYTES / (copy_ms * 1e-3) / 1e9,  # read + write
    }


# ---- memory (child process) ---------------------------------------------------------------------------


# Large allocations straight to mmap: freed tensors leave the process, so the resident set tracks live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark) in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def reset_peak_rss() -> None:
    """Reset the resident-set high-water mark (VmHWM) to the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_memory(shapes: list[Shape]) -> dict[str, dict[str, dict[str, float]]]:
    smallest = min(shapes, key=lambda s: s.batch * s.c * s.h * s.w)
    result: dict[str, dict[str, dict[str, float]]] = {}
    for shape in shapes:
        result[shape.label] = {}
        for name in methods_for(shape, smallest):
            x, f, g = shape.inputs(requires_grad=True)
            # warm up lazily allocated state (thread pools, autograd engine, caches) with a full pass
            torch.autograd.grad(METHODS[name](x, f), (x, f), g)
            reset_peak_rss()
            base = status_mb("VmRSS")
            out = METHODS[name](x, f)
            fwd = status_mb("VmHWM") - base
            grads = torch.autograd.grad(out, (x, f), g)
            total = status_mb("VmHWM") - base
            del out, grads
            result[shape.label][name] = {"forward_peak_mb": fwd, "peak_mb": total}
    return result


def memory_in_child(shapes: list[Shape]) -> dict[str, dict[str, dict[str, float]]]:
    env = dict(os.environ, **MALLOC_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "shapes.json"
        spec.write_text(json.dumps([asdict(s) for s in shapes]))
        subprocess.run([sys.executable, __file__, "--memory-child", str(spec)], env=env, check=True)
        return json.loads((Path(tmp) / "memory.json").read_text())


# ---- report -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu = platform.processor()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "featup_kernels": build_info(),
        "load_average_start": os.getloadavg(),
    }


def markdown(results: dict[str, object]) -> str:
    lines = [
        "| Shape BxHxWxCxK (paper B) | Method | Fwd ms | Bwd ms | Fwd+bwd ms "
        "| Peak MB fwd | Peak MB fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["shapes"]:
        for name, m in row["methods"].items():
            fwd, bwd = m["forward_ms"], m["backward_ms"]
            lines.append(
                f"| {row['label']} ({row['paper_batch']}) | {name} | {fwd:.2f} | {bwd:.2f} | {fwd + bwd:.2f} "
                f"| {m['forward_peak_mb']:.1f} | {m['peak_mb']:.1f} |"
            )
    lines += [
        "",
        "| Shape | Floor ms (memory / compute) | Ours fwd ms | x floor | Fwd speedup vs shifted / unfold "
        "| Fwd+bwd speedup vs shifted / unfold | Unfold peak / ours (fwd, fwd+bwd) "
        "| Required MB | Fwd+bwd peak / required: ours, unfold |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["shapes"]:
        r = row["ratios"]
        lines.append(
            f"| {row['label']} | {row['floor_ms']:.2f} "
            f"({row['memory_floor_ms']:.2f} / {row['compute_floor_ms']:.2f}) "
            f"| {row['methods']['ours']['forward_ms']:.2f} | {r['ours_forward_x_floor']:.1f} "
            f"| {r['fwd_speedup_vs_shifted']:.1f}x / {r['fwd_speedup_vs_unfold']:.1f}x "
            f"| {r['fwdbwd_speedup_vs_shifted']:.1f}x / {r['fwdbwd_speedup_vs_unfold']:.1f}x "
            f"| {r['unfold_fwd_peak_over_ours']:.0f}x, {r['unfold_peak_over_ours']:.1f}x "
            f"| {row['required_mb']:.1f} "
            f"| {r['ours_peak_over_required']:.2f}x, {r['unfold_peak_over_required']:.1f}x |"
        )
    m = results["machine"]
    rates = results["rates"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads, CPU kernels {m['featup_kernels']['cpu_isa']}; "
        f"load average {m['load_average_start'][0]:.1f} "
        f"at start, {m['load_average_end'][0]:.1f} at end. torch.mm {rates['matmul_gfma_per_s']:.1f} GFMA/s "
        f"(n={rates['matmul_n']}), copy_ {rates['copy_gb_per_s']:.1f} GB/s (read+write). "
        "Batches cut from the paper's (in parentheses) to fit CPU memory. Required MB: output + input "
        "gradient + filter gradient, the least any implementation holds at the end of forward + backward.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, object]:
    shapes = scaled_shapes(args.max_unfold_mb)
    if args.quick:
        shapes = [s for s in shapes if s.c * s.h * s.w * s.batch <= 2**21]
    smallest = min(shapes, key=lambda s: s.batch * s.c * s.h * s.w)
    machine = machine_info()
    rates = machine_rates(args.budget)
    memory = memory_in_child(shapes)
    rows = []
    for shape in shapes:
        methods = {}
        for name in methods_for(shape, smallest):
            print(f"  {shape.label} {name} ...", file=sys.stderr, flush=True)
            methods[name] = {**time_method(name, shape, args.budget), **memory[shape.label][name]}
        memory_floor = shape.io_bytes / (rates["copy_gb_per_s"] * 1e9) * 1e3
        compute_floor = shape.fmas / (rates["matmul_gfma_per_s"] * 1e9) * 1e3
        floor = max(memory_floor, compute_floor)
        ours, unfold, shifted = methods["ours"], methods["unfold"], methods["shifted"]

        def total(m: dict[str, float]) -> float:
            return m["forward_ms"] + m["backward_ms"]

        rows.append(
            {
                "label": shape.label,
                "paper_batch": shape.paper_batch,
                **asdict(shape),
                "fmas": shape.fmas,
                "io_bytes": shape.io_bytes,
                "required_mb": shape.required_bytes / 2**20,
                "memory_floor_ms": memory_floor,
                "compute_floor_ms": compute_floor,
                "floor_ms": floor,
                "methods": methods,
                "ratios": {
                    "ours_forward_x_floor": ours["forward_ms"] / floor,
                    "fwd_speedup_vs_shifted": shifted["forward_ms"] / ours["forward_ms"],
                    "fwd_speedup_vs_unfold": unfold["forward_ms"] / ours["forward_ms"],
                    "fwdbwd_speedup_vs_shifted": total(shifted) / total(ours),
                    "fwdbwd_speedup_vs_unfold": total(unfold) / total(ours),
                    "unfold_fwd_peak_over_ours": unfold["forward_peak_mb"]
                    / max(ours["forward_peak_mb"], 1e-3),
                    "unfold_peak_over_ours": unfold["peak_mb"] / max(ours["peak_mb"], 1e-3),
                    "ours_peak_over_required": ours["peak_mb"] / (shape.required_bytes / 2**20),
                    "unfold_peak_over_required": unfold["peak_mb"] / (shape.required_bytes / 2**20),
                },
            }
        )
    machine["load_average_end"] = os.getloadavg()
    return {"machine": machine, "rates": rates, "max_unfold_mb": args.max_unfold_mb, "shapes": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", type=Path, default=Path("bench-results/bench_kernels.json"), help="output JSON"
    )
    parser.add_argument(
        "--max-unfold-mb", type=float, default=256.0, help="batch cap: unfold patches per shape"
    )
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    parser.add_argument("--quick", action="store_true", help="only the smaller shapes (a smoke run)")
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="quick mode: only our op's forward and backward (wall and CPU ms), no other methods or memory",
    )
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        shapes = [Shape(**s) for s in json.loads(args.memory_child.read_text())]
        (args.memory_child.parent / "memory.json").write_text(json.dumps(measure_memory(shapes)))
        return
    if args.ours_only:
        results = run_ours_only(args)
        table = str(results["markdown"])
    else:
        results = run(args)
        table = markdown(results)
        results["markdown"] = table
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.json)  # atomic: never a half-written result


if __name__ == "__main__":
    main()
