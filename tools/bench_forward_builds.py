"""JBU forward against bilinear, with two (or more) builds of featup-kernels, alternating processes.

A change inside the compiled ops (not in ``jbu.py``) cannot be timed before/after in one process: each build is
its own extension module. This script runs one short subprocess per (round, build), the builds alternating
round by round so that load changes hit them alike, and reports per build the median over rounds of each
process's medians: ``JBUStack()`` forward (default layout, gates at 1: the ``jbu_forward`` setup of
``tools/bench_perf.py``, imported from it), bilinear ``F.interpolate`` to the same size in the same process,
and their ratio. Time is the process's CPU time (one thread), so waiting for a core shared with other jobs
does not count; the memory system is still shared, which is why several rounds are needed.

A build is ``LABEL=PATH``: PATH is a directory that holds ``featup/kernels`` (``pip install --target PATH
packages/featup-kernels``), put first on ``sys.path`` in the subprocess, or ``installed`` for the environment's
own ``featup.kernels``.

Run:  python tools/bench_forward_builds.py --build before=/tmp/kb_before --build now=installed \
          --channels 384 1024 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

_BENCH_PERF = Path(__file__).resolve().parent / "bench_perf.py"  # the forward's setup: its _jbu_callables

_CHILD = r"""
import importlib.util, json, statistics, sys, time
import torch
import featup.kernels

channels, size, lr, repeats, tool = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("bench_perf", tool)
bench_perf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_perf)
torch.set_num_threads(1)
result = {"kernels": featup.kernels.__file__}
for c in channels:
    every = bench_perf._jbu_callables({"channels": c, "lr": lr, "out": size})  # bench_perf's own setup
    calls = {"bilinear": every["bilinear"], "jbu": every["jbu (fused)"]}
    times = {k: [] for k in calls}
    with torch.inference_mode():
        for f in calls.values():
            f()
        for _ in range(repeats):
            for k, f in calls.items():
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
    result[str(c)] = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps(result))
"""


def parse_build(text: str) -> tuple[str, str]:
    """``LABEL=PATH`` -> (label, path); PATH must hold featup/kernels, or be ``installed``."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected --build LABEL=PATH, got {text!r}")
    if path != "installed" and not (Path(path) / "featup" / "kernels" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"expected PATH to hold featup/kernels/__init__.py, got {path!r}")
    return label, path


def run_child(path: str, channels: list[int], size: int, lr: int, repeats: int) -> dict[str, Any]:
    """One subprocess with the build at ``path`` first on the path; its medians (seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if path != "installed":
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([channels, size, lr, repeats, str(_BENCH_PERF)])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark process for {path!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--build", type=parse_build, action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--channels", type=int, nargs="+", default=[384, 1024])
    parser.add_argument("--size", type=int, default=224, help="output side (px)")
    parser.add_argument("--lr", type=int, default=14, help="feature map side")
    parser.add_argument("--rounds", type=int, default=5, help="processes per build, alternating")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method in each process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    labels = [label for label, _ in args.build]
    if len(set(labels)) != len(labels):
        parser.error(f"expected distinct build labels, got {labels}")
    if min(args.channels) < 1 or args.rounds < 1 or args.repeats < 1 or args.lr < 1 or args.size < args.lr:
        parser.error("expected positive --channels, --rounds, --repeats, --lr and --size >= --lr")
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label, path in args.build:
            runs[label].append(run_child(path, args.channels, args.size, args.lr, args.repeats))
    rows = []
    for label in labels:
        for c in args.channels:
            per = [r[str(c)] for r in runs[label]]
            jbu = statistics.median(p["jbu"] for p in per)
            bil = statistics.median(p["bilinear"] for p in per)
            ratios = sorted(p["jbu"] / p["bilinear"] for p in per)
            rows.append(
                {
                    "build": label,
                    "channels": c,
                    "jbu_ms": 1e3 * jbu,
                    "bilinear_ms": 1e3 * bil,
                    "ratio_median": statistics.median(ratios),
                    "ratio_range": [ratios[0], ratios[-1]],
                }
            )
    print("| build | channels | JBU ms | bilinear ms | JBU / bilinear (median, range over rounds) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["ratio_range"]
        print(
            f"| {r['build']} | {r['channels']} | {r['jbu_ms']:.0f} | {r['bilinear_ms']:.0f} | "
            f"{r['ratio_median']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    settings = {k: getattr(args, k) for k in ("channels", "size", "lr", "rounds", "repeats")}
    result = {"settings": settings | {"builds": dict(args.build)}, "rows": rows}
    if args.json is not None:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
