"""Performance benchmark: FeatUp's hot paths against the plain implementation and the baselines, one run.

Sections (a list of functions: each returns rows, the table prints them in order; add new sections to
``SECTIONS``):

- ``jbu_forward``: ``JBUStack`` forward, one image, ``C``-channel 14 x 14 features to 224 x 224 px (16x, four
  2x stages) under ``torch.inference_mode()``, for C = 384 and 1024: the fused path (default), the plain
  path (``up.fused = False``: resize, pad and kernel computed step by step, the reference the fused path is
  tested against), bilinear and bicubic ``F.interpolate``, and the fused path without its final back-projection
  (``consistency=False``; the default stack runs it, see ``featup.core.consistency``). The stack has the default layout with its
  safe-start gates at 1 (a trained stack's cost; the values do not change the work done). With a
  featup-kernels build that has ``jbu_stage_kernel``, also the fused path with its stage kernels computed by
  torch ops (``stage.kernel_op = False``, the training path's kernels) instead of that op.
- ``train_jbu``: one ``train_jbu`` step at Table 7's settings (batch 4, 2 jitters, attention downsampler,
  30-d projection, a frozen 384-channel stride-16 patch backbone) at ``--train-size`` px (default 224; the
  plain path then peaks at about 5 GB resident): the plain step
  (``project_first=False``, every step upsamples all C channels) against today's default (projected first).
  Reuses ``tools/bench_perf_training.py``.
- ``fit_implicit``: one ``fit_implicit`` step at Table 7's settings (224 px, 384 channels, 10 jitters,
  attention downsampler, kernel 29, PCA 128): the plain step (``preset="paper"``: fresh views, jitter then
  pool) against the fast path (view bank, fused jitter + pooling grouped into slab GEMMs, channel dropout,
  the whole-grid field without a per-pixel encoding) and the default preset; the row "fast path, per-pixel
  field" is the fast path with ``ImplicitUpsampler.fast_field = False`` (what the grid field buys, same run).
  Reuses ``tools/bench_perf_implicit.py``. Profile and history: ``docs/decisions.md#implicit-grid``.

Every row has ``time_ratio`` = its time / its baseline's time in the same run (``time_vs`` names the
baseline) and ``speedup`` = the inverse.

Method: ratios within one run, never absolute figures across runs (the machine's speed moves by up to 2x).
Time is the median of ``--repeats`` calls after a warm-up, the methods of a case interleaved call by call so
that load changes hit all of them alike. Peak memory runs each (case, method) in a fresh subprocess with a
fixed glibc mmap threshold (large tensors are returned to the system on free, so the resident size follows
live tensors): after a warm-up call the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and
the peak is ``VmHWM`` after one call minus ``VmRSS`` before it (inputs excluded, output included), reported
in MB and as a multiple of the output tensor's size. Where clear_refs is not writable memory is reported as
unavailable.

Run:  python tools/bench_perf.py [--quick] [--json out.json] [--repeats N] [--no-memory] [--sections ...]
      python tools/bench_perf.py --jbu-before old_jbu.py   # also time an older jbu.py, same weights, same run
      python tools/bench_perf.py --check out.json    # validate a result file's structure (CI)
``--quick`` (CI, well under a minute): JBU 64 / 128 channels, 7 x 7 -> 112 px, two repeats; training and
fitting at 64 px with 64 channels, one timed step per path. Its ratios mean little (at such widths the
kernel computation dominates); it exists so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# measurement helpers (shared by every section)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each callable, the callables interleaved call by call."""
    for fn in calls.values():  # warm-up: thread pools, cached plans, lazily initialised kernels
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_subprocess(section: str, case: dict[str, Any], method: str) -> float | None:
    """Peak extra resident MB of one call, measured in a fresh process; None where unavailable."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        __file__,
        "--_memory",
        json.dumps({"section": section, "case": case, "method": method}),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {section}/{method} failed:\n{res.stderr[-2000:]}")
    value = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    return None if value is None else float(value)


def _memory_probe(spec: dict[str, Any]) -> None:
    """Child process: build the case, warm up, reset the peak counter, call once, print the peak."""
    import torch

    torch.set_num_threads(1)
    fn = MEMORY_FACTORIES[spec["section"]](spec["case"], spec["method"])
    with torch.inference_mode():
        fn()
        if not _reset_peak():
            print(json.dumps({"peak_mb": None}))
            return
        before = _rss_kb("VmRSS")
        out = fn()
        peak = _rss_kb("VmHWM") - before
    del out
    print(json.dumps({"peak_mb": peak / 1024}))


# ---------------------------------------------------------------------------------------------------------
# section: JBU forward


def _jbu_callables(case: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    from featup.core import JBUStack

    channels, lr, out = case["channels"], case["lr"], case["out"]
    torch.manual_seed(0)
    stack = JBUStack().eval()
    with torch.no_grad():
        for stage in stack.stages:
            stage.gate.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, channels, lr, lr, generator=g)
    image = torch.rand(1, 3, out, out, generator=g)

    def jbu(fused: bool) -> Callable[[], Any]:
        def call() -> Any:
            stack.fused = fused
            return stack(feats, image)

        return call

    def interp(mode: str) -> Callable[[], Any]:
        return lambda: F.interpolate(feats, size=(out, out), mode=mode, align_corners=False)

    calls: dict[str, Callable[[], Any]] = {}
    if case.get("jbu_before"):
        # the same stack (same weights) built from an older jbu.py: before / after in one run
        before = _load_old_jbu(case["jbu_before"]).JBUStack().eval()
        before.load_state_dict(stack.state_dict())

        def jbu_before() -> Any:
            return before(feats, image)

        calls["jbu (fused, before: --jbu-before)"] = jbu_before

    def jbu_torch_kernels() -> Any:
        # the stage kernels with torch ops instead of featup.kernels.jbu_stage_kernel (kernel_op=False)
        stack.fused = True
        for stage in stack.stages:
            stage.kernel_op = False
        try:
            return stack(feats, image)
        finally:
            for stage in stack.stages:
                stage.kernel_op = True

    if all(hasattr(stage, "kernel_op") for stage in stack.stages):
        calls["jbu (fused, torch-op kernels)"] = jbu_torch_kernels

    def jbu_without_back_projection() -> Any:
        stack.fused, stack.consistency = True, False
        try:
            return stack(feats, image)
        finally:
            stack.consistency = True

    return {
        "bilinear": interp("bilinear"),
        "bicubic": interp("bicubic"),
        "jbu (plain path)": jbu(False),
        **calls,
        "jbu (fused)": jbu(True),
        "jbu (fused, no back-projection)": jbu_without_back_projection,
    }


def _load_old_jbu(path: str) -> Any:
    """Import an older ``featup/core/jbu.py`` (e.g. ``git show main:packages/featup-core/src/featup/core/
    jbu.py``) as a separate module, against today's featup.core and featup.kernels; its registry entries
    are discarded (the names are taken)."""
    import importlib.util

    from featup.core import registry

    spec = importlib.util.spec_from_file_location("featup_jbu_before", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    saved = dict(registry._REGISTRY)
    registry._REGISTRY.clear()
    try:
        spec.loader.exec_module(module)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
    return module


def jbu_forward(args: argparse.Namespace) -> list[Row]:
    import torch

    torch.set_num_threads(1)
    cases = (
        [{"channels": 64, "lr": 7, "out": 112}, {"channels": 128, "lr": 7, "out": 112}]
        if args.quick
        else [{"channels": 384, "lr": 14, "out": 224}, {"channels": 1024, "lr": 14, "out": 224}]
    )
    rows: list[Row] = []
    for case in cases:
        if args.jbu_before:
            case = {**case, "jbu_before": str(args.jbu_before)}
        calls = _jbu_callables(case)
        with torch.inference_mode():
            times = time_interleaved(calls, args.repeats)
        out_mb = case["channels"] * case["out"] ** 2 * 4 / 2**20
        label = f"{case['channels']} ch, {case['lr']}x{case['lr']} -> {case['out']}x{case['out']}"
        for method, seconds in times.items():
            peak = None if args.no_memory else peak_memory_subprocess("jbu_forward", case, method)
            rows.append(
                {
                    "section": "jbu_forward",
                    "case": label,
                    "method": method,
                    "time_ms": 1e3 * seconds,
                    "time_vs": "bilinear",
                    "time_ratio": seconds / times["bilinear"],
                    "speedup": times["bilinear"] / seconds,
                    "peak_mb": peak,
                    "output_mb": out_mb,
                    "peak_vs_output": None if peak is None else peak / out_mb,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------
# sections: train_jbu and fit_implicit steps (the step loops live in the two single-purpose scripts)

TOOLS = Path(__file__).resolve().parent


def _tool(name: str) -> Any:
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    import importlib

    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def _step_rows(section: str, case: str, samples: dict[str, list[float]], baseline: str) -> list[Row]:
    base = statistics.median(samples[baseline])
    rows = []
    for method, values in samples.items():
        med = statistics.median(values)
        rows.append(
            {
                "section": section,
                "case": case,
                "method": method,
                "time_ms": 1e3 * med,
                "time_vs": baseline,
                "time_ratio": med / base,
                "speedup": base / med,
                "steps_timed": len(values),
                "peak_mb": None,
                "output_mb": None,
                "peak_vs_output": None,
            }
        )
    return rows


def train_jbu_step(args: argparse.Namespace) -> list[Row]:
    import torch

    torch.set_num_threads(1)
    training = _tool("bench_perf_training")
    quick = args.quick
    settings = argparse.Namespace(
        size=64 if quick else args.train_size,
        channels=64 if quick else 384,
        batch=4,
        jitters=2,
        proj_dim=30,
        steps=1 if quick else args.steps,
        threads=1,
    )
    paths = {"plain (project_first=False)": False, "projected first (default)": True}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(1 if quick else args.step_repeats):  # alternating runs, so load changes hit both
        for name, project_first in paths.items():
            samples[name] += training._step_times(project_first, settings)
    case = f"{settings.size} px, batch 4, 2 jitters, attention, 30-d, {settings.channels} ch patch backbone"
    return _step_rows("train_jbu", case, samples, "plain (project_first=False)")


def fit_implicit_step(args: argparse.Namespace) -> list[Row]:
    import torch

    torch.set_num_threads(1)
    from featup.core.implicit import ImplicitUpsampler

    implicit = _tool("bench_perf_implicit")
    size, channels, jitters = (64, 64, 4) if args.quick else (224, 384, 10)
    steps = 1 if args.quick else args.steps
    backbone = implicit.PatchBackbone(channels).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    common = {"n_jitters": jitters, "kernel_size": 29, "pca_dim": 128}
    fast = {"preset": "paper", "bank_size": 64, "fused": True, "dropout_mode": "channel", **common}
    paths = {
        "plain (preset paper)": {"preset": "paper", **common},
        "fast path (bank, fused pooling, channel dropout)": fast,
        "fast path, per-pixel field (fast_field=False)": fast,
        "default preset (own downsampler settings)": {"n_jitters": jitters, "pca_dim": 128},
    }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(1 if args.quick else args.step_repeats):
        for name, settings in paths.items():
            ImplicitUpsampler.fast_field = "per-pixel field" not in name
            try:
                samples[name] += implicit.step_times(backbone, image, steps, settings)
            finally:
                ImplicitUpsampler.fast_field = True
    case = f"{size} px, {channels} ch, {jitters} jitters, attention k29, PCA 128"
    return _step_rows("fit_implicit", case, samples, "plain (preset paper)")


#: every section: name -> function(args) -> rows, in table order
SECTIONS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "jbu_forward": jbu_forward,
    "train_jbu": train_jbu_step,
    "fit_implicit": fit_implicit_step,
}

#: the keys of every row of the JSON (``--check`` validates them)
ROW_KEYS = {
    "section": str,
    "case": str,
    "method": str,
    "time_ms": float,
    "time_vs": str,
    "time_ratio": float,
    "speedup": float,
    "peak_mb": (float, type(None)),
    "output_mb": (float, type(None)),
    "peak_vs_output": (float, type(None)),
}


def check_result(path: Path) -> list[str]:
    """Structural problems of a result file written with ``--json`` (empty when it is sound); not timings."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return [f"cannot read {path}: {exc}"]
    problems = []
    if not isinstance(data, dict) or not {"settings", "rows"} <= data.keys():
        return [f"expected an object with 'settings' and 'rows', got {type(data).__name__}"]
    rows = data["rows"]
    sections = {r.get("section") for r in rows if isinstance(r, dict)}
    wanted = set(data["settings"].get("sections", SECTIONS))
    if sections != wanted:
        problems.append(f"sections {sorted(map(str, sections))}, expected {sorted(wanted)}")
    for i, row in enumerate(rows):
        for key, kind in ROW_KEYS.items():
            if key not in row:
                problems.append(f"row {i}: missing {key!r}")
            elif isinstance(row[key], bool) or not isinstance(row[key], kind):
                problems.append(f"row {i}: {key!r} = {row[key]!r}, expected {kind}")
        if isinstance(row.get("time_ratio"), float) and not row["time_ratio"] > 0:
            problems.append(f"row {i}: time_ratio {row['time_ratio']} is not positive")
    for section in sections:
        baselines = [r for r in rows if r.get("section") == section and r.get("method") == r.get("time_vs")]
        if not baselines:
            problems.append(f"section {section}: no row for its baseline")
    return problems


#: sections that measure memory: name -> (case, method) -> the callable whose peak is measured
MEMORY_FACTORIES: dict[str, Callable[[dict[str, Any], str], Callable[[], Any]]] = {
    "jbu_forward": lambda case, method: _jbu_callables(case)[method],
}


# ---------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| section | case | method | baseline | time (ms) | time / baseline | speed-up | peak memory (MB) "
        "| peak / output |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['section']} | {r['case']} | {r['method']} | {r['time_vs']} | {_fmt(r['time_ms'])} | "
            f"{_fmt(r['time_ratio'], 2)} | {_fmt(r['speedup'], 2)}x | {_fmt(r['peak_mb'])} | "
            f"{_fmt(r['peak_vs_output'], 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small cases for CI")
    ap.add_argument("--json", type=Path, default=None, help="write the rows and settings as JSON")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 7, quick 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--train-size", type=int, default=224, help="train_jbu image size (default 224)")
    ap.add_argument("--steps", type=int, default=2, help="timed train/fit steps per run (default 2)")
    ap.add_argument("--step-repeats", type=int, default=1, help="alternating train/fit runs (default 1)")
    ap.add_argument(
        "--jbu-before",
        type=Path,
        default=None,
        help="an older jbu.py to time alongside (row 'jbu (fused, before: --jbu-before)', same weights)",
    )
    ap.add_argument("--check", type=Path, default=None, help="validate the structure of a result JSON, exit")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check is not None:
        problems = check_result(args.check)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(f"{args.check}: structure ok")
        return []
    if args._memory is not None:
        _memory_probe(json.loads(args._memory))
        return []
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.repeats < 1:
        ap.error(f"expected --repeats >= 1, got {args.repeats}")
    rows: list[Row] = []
    for name in args.sections:
        rows.extend(SECTIONS[name](args))
    print(markdown(rows))
    if args.json is not None:
        settings = {
            "quick": args.quick,
            "repeats": args.repeats,
            "sections": args.sections,
            "train_size": args.train_size,
            "steps": args.steps,
            "step_repeats": args.step_repeats,
            "jbu_before": None if args.jbu_before is None else str(args.jbu_before),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
