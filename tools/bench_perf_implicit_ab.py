"""fit_implicit step time of two versions of featup-core in ONE process, interleaved (before/after a change).

On a shared CPU the load moves step times by up to 2x between runs, so two separate runs of
``tools/bench_perf.py`` cannot compare two versions reliably. This script imports the "before" tree under
another package name (``featup_before.core``, a rewritten copy in a temporary directory) next to this
worktree's ``featup.core``, and alternates fits of both (each ``--steps`` timed steps after one warm-up step)
``--repeats`` times, at Table 7's settings (224 px, 384-channel stride-16 patch backbone, 10 jitters,
attention downsampler, kernel 29, PCA 128). It reports the median step of each path in wall time and in the
process's CPU time (less sensitive to other processes on the machine), and the ratios within the run::

    mkdir -p /tmp/before && git archive <base-commit> packages | tar -x -C /tmp/before
    python tools/bench_perf_implicit_ab.py --before /tmp/before --repeats 4 --json out.json

The plain step (``preset="paper"``) is timed with both versions too (``--plain-repeats``, it is ~10x slower).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "featup-core" / "src"))
sys.path.insert(0, str(ROOT / "tools"))


def import_before(tree: Path, workdir: Path):
    """``featup.core`` of ``tree`` (a checkout or archive holding packages/featup-core/src) as
    ``featup_before.core``."""
    src = tree / "packages" / "featup-core" / "src" / "featup" / "core"
    if not (src / "implicit_fit.py").is_file():
        raise SystemExit(f"expected a featup tree with packages/featup-core/src/featup/core under {tree}")
    dst = workdir / "featup_before" / "core"
    shutil.copytree(src, dst)
    (workdir / "featup_before" / "__init__.py").write_text("")
    for path in dst.rglob("*.py"):
        path.write_text(re.sub(r"\bfeatup\.core\b", "featup_before.core", path.read_text()))
    sys.path.insert(0, str(workdir))
    import featup_before.core as before

    return before


def step_times(fit, backbone, image, steps: int, settings: dict) -> tuple[list[float], list[float]]:
    """Wall and CPU time of each step after the first (the first includes the bank, PCA and warm-up)."""
    wall: list[float] = []
    cpu: list[float] = []

    def mark(step, logs):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    fit(backbone, image, steps + 1, progress=False, callback=mark, **settings)
    return [b - a for a, b in zip(wall, wall[1:])], [b - a for a, b in zip(cpu, cpu[1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="tree of the version to compare against")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--plain-repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bench_perf_implicit import PatchBackbone

    import featup.core as after

    with tempfile.TemporaryDirectory() as tmp:
        before = import_before(args.before, Path(tmp))
        backbone = PatchBackbone(384).eval()
        image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        common = {"n_jitters": 10, "kernel_size": 29, "pca_dim": 128}
        fast = {"preset": "paper", "bank_size": 64, "fused": True, "dropout_mode": "channel", **common}
        paths = {
            "fast path, before": (before.fit_implicit, fast, args.repeats),
            "fast path, after": (after.fit_implicit, fast, args.repeats),
            "default preset, before": (before.fit_implicit, {"n_jitters": 10, "pca_dim": 128}, args.repeats),
            "default preset, after": (after.fit_implicit, {"n_jitters": 10, "pca_dim": 128}, args.repeats),
            "plain (preset paper), before": (
                before.fit_implicit,
                {"preset": "paper", **common},
                args.plain_repeats,
            ),
            "plain (preset paper), after": (
                after.fit_implicit,
                {"preset": "paper", **common},
                args.plain_repeats,
            ),
        }
        wall: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(max(args.repeats, args.plain_repeats)):
            for name, (fit, settings, reps) in paths.items():
                if rep < reps:
                    w, c = step_times(fit, backbone, image, args.steps, settings)
                    wall[name] += w
                    cpu[name] += c
    med_w = {k: statistics.median(v) for k, v in wall.items()}
    med_c = {k: statistics.median(v) for k, v in cpu.items()}
    plain_w = statistics.median(wall["plain (preset paper), before"] + wall["plain (preset paper), after"])
    plain_c = statistics.median(cpu["plain (preset paper), before"] + cpu["plain (preset paper), after"])
    print("fit_implicit step, 224 px, 384 ch, 10 jitters, attention k29, PCA 128 (one process, interleaved)")
    print("| path | wall (ms) | CPU (ms) | speed-up vs plain, wall | speed-up vs plain, CPU | steps |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in paths:
        row = {
            "path": name,
            "wall_ms": 1e3 * med_w[name],
            "cpu_ms": 1e3 * med_c[name],
            "speedup_wall": plain_w / med_w[name],
            "speedup_cpu": plain_c / med_c[name],
            "steps_timed": len(wall[name]),
        }
        rows.append(row)
        print(
            f"| {name} | {row['wall_ms']:.0f} | {row['cpu_ms']:.0f} | {row['speedup_wall']:.2f}x | "
            f"{row['speedup_cpu']:.2f}x | {row['steps_timed']} |"
        )
    for kind in ("fast path", "default preset"):
        print(
            f"{kind}: after / before = {med_w[kind + ', after'] / med_w[kind + ', before']:.3f} (wall), "
            f"{med_c[kind + ', after'] / med_c[kind + ', before']:.3f} (CPU)"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
