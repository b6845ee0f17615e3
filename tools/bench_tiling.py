"""Peak memory and time of tiled vs untiled JBU upsampling and implicit rendering on the CPU.

    /work/venv/bin/python tools/bench_tiling.py   # 1024-4096 px; writes tools/results/bench_tiling.json
    /work/venv/bin/python tools/bench_tiling.py --sizes 512 1024 --json /tmp/b.json

How memory is measured: every case runs in a fresh subprocess (``python tools/bench_tiling.py --case ...``)
that imports torch, builds the upsampler and its inputs, reads ``getrusage(RUSAGE_SELF).ru_maxrss`` (the
high-water mark of its resident set), runs the case once, and reads it again. ``peak_mib`` is the process's
peak RSS; ``op_mib`` is the growth of that high-water mark caused by the upsampling itself, which includes the
result; ``work_mib`` subtracts the result's own size: the working memory the method needs on top of its
output. A fresh process per case means no allocator cache or earlier case inflates the numbers, and
``MALLOC_MMAP_THRESHOLD_=131072`` makes glibc map every large tensor separately and unmap it when freed, so
the resident set follows the live tensors (with glibc's default dynamic threshold repeated runs differed by
hundreds of MiB). Untiled cases
run under ``RLIMIT_AS`` (address space of the process at the start of the case plus ``--cap-gib``), so a case
that would need more is reported as "over cap" instead of swamping a shared machine.

Setup: features with ``--channels`` channels at 1/16 of the output size (a ViT-16 grid), guidance image of the
output size, ``JBUStack()`` with random weights (memory and time do not depend on the weights), one thread
(``--threads``). The implicit upsampler renders its network's features at the output size in pixel chunks
(``ImplicitUpsampler.render``); it is timed at each size the same way. Times are one run each (the process
is fresh, so the first call's one-off costs are included); ratios are against the untiled run in the same
invocation. The mixed-precision rows give bfloat16/float16 autocast error against float32
(``featup.core.precision.precision_error``) at the smallest size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MIB = 1024 * 1024


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(kind: str, size: int, tile: int, channels: int, threads: int, cap_gib: float) -> dict:
    """One measurement in this (fresh) process; prints nothing, returns the record."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(1, channels, size // 16, size // 16, generator=g)
    image = torch.rand(1, 3, size, size, generator=g)
    if kind.startswith("jbu"):
        from featup.core.jbu import JBUStack
        from featup.core.tiling import tiled_upsample

        torch.manual_seed(0)
        up = JBUStack().eval()

        def call():
            if kind == "jbu_tiled":
                return tiled_upsample(up, lr, image, tile=tile)
            with torch.inference_mode():
                return up(lr, image)
    elif kind == "implicit":
        from featup.core.implicit import ImplicitUpsampler

        torch.manual_seed(0)
        from featup.core.pca import PCA

        imp = ImplicitUpsampler(channels, (size, size)).eval()
        imp.set_image(image)
        imp.set_pca(PCA(channels, channels).fit(torch.randn(1, channels, 16, 16, generator=g)))

        def call():
            return imp.render((size, size))
    else:
        raise ValueError(f"unknown case {kind!r}")
    if kind == "jbu_untiled" and cap_gib > 0:
        limit = _vm_size_bytes() + int(cap_gib * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = _maxrss_bytes()
    start = time.perf_counter()
    try:
        out = call()
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {"kind": kind, "size": size, "tile": tile, "status": f"over cap ({cap_gib:g} GiB)"}
    seconds = time.perf_counter() - start
    peak = _maxrss_bytes()
    out_bytes = out.numel() * out.element_size()
    return {
        "kind": kind,
        "size": size,
        "tile": tile if kind == "jbu_tiled" else None,
        "status": "ok",
        "seconds": seconds,
        "peak_mib": peak / MIB,
        "op_mib": (peak - before) / MIB,
        "out_mib": out_bytes / MIB,
        "work_mib": max(0.0, (peak - before - out_bytes) / MIB),
        "shape": list(out.shape),
    }


def precision_rows(size: int, channels: int, threads: int) -> list[dict]:
    import torch

    from featup.core.jbu import JBUStack
    from featup.core.precision import adaptive_conv_autocast_error, precision_error

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(1, channels, size // 16, size // 16, generator=g)
    image = torch.rand(1, 3, size, size, generator=g)
    torch.manual_seed(0)
    up = JBUStack().eval()
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        start = time.perf_counter()
        err = precision_error(up, lr, image, dtype=dtype)
        conv = adaptive_conv_autocast_error(dtype)
        rows.append(
            {
                **err.as_dict(),
                "size": size,
                "seconds_incl_fp32_ref": time.perf_counter() - start,
                "adaptive_conv_rel_max": conv["rel_max"],
                "adaptive_conv_dtype": conv["output_dtype"],
            }
        )
    return rows


def _subprocess(args: list[str], timeout: float) -> dict:
    # a fixed mmap threshold makes glibc return every freed large block to the OS at once; with its default
    # dynamic threshold, freed tensors stay in the heap and ru_maxrss drifts by hundreds of MiB between runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed: {tail[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=8.0, help="address-space cap for untiled cases")
    p.add_argument("--untiled-max", type=int, default=2048, help="largest size tried untiled")
    p.add_argument("--skip-implicit", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "bench_tiling.json"))
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--precision-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # child process: one measurement, JSON on the last line
        rec = run_case(args.case, args.size, args.tile, args.channels, args.threads, args.cap_gib)
        print(json.dumps(rec))
        return 0
    if args.precision_only:
        print(json.dumps(precision_rows(args.size, args.channels, args.threads)))
        return 0

    common = [
        "--tile",
        str(args.tile),
        "--channels",
        str(args.channels),
        "--threads",
        str(args.threads),
        "--cap-gib",
        str(args.cap_gib),
    ]
    records = []
    for size in args.sizes:
        kinds = ["jbu_tiled"] + (["jbu_untiled"] if size <= args.untiled_max else [])
        kinds += [] if args.skip_implicit else ["implicit"]
        for kind in kinds:
            rec = {
                "kind": kind,
                "size": size,
                **_subprocess(["--case", kind, "--size", str(size), *common], args.timeout),
            }
            records.append(rec)
            print(
                f"  {kind:12s} {size:5d}px: {rec.get('status')} {_fmt(rec.get('seconds'), 2)} s "
                f"peak {_fmt(rec.get('peak_mib'), 0)} MiB",
                file=sys.stderr,
                flush=True,
            )
        if size > args.untiled_max:
            records.append(
                {
                    "kind": "jbu_untiled",
                    "size": size,
                    "status": f"not run (> --untiled-max {args.untiled_max})",
                }
            )
    prec = _subprocess(["--precision-only", "--size", str(min(args.sizes)), *common], args.timeout)
    prec_rows = prec if isinstance(prec, list) else []

    untiled = {r["size"]: r for r in records if r["kind"] == "jbu_untiled" and r.get("status") == "ok"}
    header = [
        "case",
        "size",
        "tile",
        "time s",
        "peak RSS MiB",
        "op MiB",
        "output MiB",
        "working MiB",
        "time vs untiled",
        "working vs untiled",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in records:
        ok = r.get("status") == "ok"
        base = untiled.get(r["size"])
        t_ratio = (
            f"{r['seconds'] / base['seconds']:.2f}x" if ok and base and r["kind"] == "jbu_tiled" else "-"
        )
        w_ratio = (
            f"{r['work_mib'] / max(base['work_mib'], 1e-9):.2f}x"
            if ok and base and r["kind"] == "jbu_tiled"
            else "-"
        )
        cells = [r["kind"], str(r["size"]), str(r.get("tile") or "-")]
        if ok:
            cells += [
                _fmt(r["seconds"], 2),
                _fmt(r["peak_mib"], 0),
                _fmt(r["op_mib"], 0),
                _fmt(r["out_mib"], 0),
                _fmt(r["work_mib"], 0),
                t_ratio,
                w_ratio,
            ]
        else:
            cells += [r.get("status", "?")] + ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    ptable = ""
    if prec_rows:
        ph = [
            "dtype",
            "size",
            "rel L2 vs fp32",
            "rel max",
            "min cosine",
            "adaptive conv rel max (1 rounding)",
        ]
        plines = ["| " + " | ".join(ph) + " |", "|" + "|".join(["---"] * len(ph)) + "|"]
        for r in prec_rows:
            plines.append(
                f"| {r['dtype']} | {r['size']} | {r['rel_l2']:.2e} | {r['rel_max']:.2e} | "
                f"{r['min_cosine']:.6f} | {r['adaptive_conv_rel_max']:.2e} |"
            )
        ptable = "\n".join(plines)
    print(table)
    if ptable:
        print()
        print(ptable)
    meta = {
        "channels": args.channels,
        "threads": args.threads,
        "tile": args.tile,
        "cap_gib": args.cap_gib,
        "lr_grid": "size/16",
        "python": sys.version.split()[0],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"meta": meta, "cases": records, "precision": prec_rows}, indent=2) + "\n"
    )
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
