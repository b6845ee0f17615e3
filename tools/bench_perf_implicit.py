"""Step time of ``fit_implicit``: the plain path (today's) against the fast path, as ratios within one run.

    python tools/bench_perf_implicit.py                # Table 7's settings: 224 px, 384 channels, 10 jitters
    python tools/bench_perf_implicit.py --quick        # 64 px, 64 channels, 4 jitters (CI smoke test)
    python tools/bench_perf_implicit.py --json out.json

Both paths run the same settings (Table 7: attention downsampler, kernel 29, PCA 128, 10 jitters) on a frozen
patch backbone (one strided convolution, ``C`` channels, stride 16) and one random image. "plain" is
``preset="paper"`` (fresh views through the backbone every step, each view's features jittered and pooled by
the downsampler module); "fast" is the same with the view bank and the fused jitter + pooling. The rows in
between switch one change at a time; the last row is ``fit_implicit``'s default preset, whose own settings
(downsampler, kernel) differ from Table 7. Each path is timed over ``--steps`` steps after a warm-up, ``--repeats``
times interleaved; the median step time is reported, and the speed-up as the ratio of medians (timings on a
shared CPU move by up to 2x between runs; the ratio within one run is what to compare).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for pkg in ("featup-core",):
    sys.path.insert(0, str(ROOT / "packages" / pkg / "src"))

from featup.core import fit_implicit  # noqa: E402


class PatchBackbone(nn.Module):
    """A frozen stride-16 patch embedding (the cheapest backbone with Table 7's feature shape)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 16, 16)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def step_times(backbone: nn.Module, image: torch.Tensor, steps: int, settings: dict) -> list[float]:
    """Wall time of each step after the first (the first includes the set-up: bank, PCA)."""
    marks: list[float] = []
    fit_implicit(
        backbone,
        image,
        steps + 1,
        progress=False,
        callback=lambda s, logs: marks.append(time.perf_counter()),
        **settings,
    )
    return [b - a for a, b in zip(marks, marks[1:])]


def setup_time(backbone: nn.Module, image: torch.Tensor, settings: dict) -> float:
    start = time.perf_counter()
    fit_implicit(backbone, image, 1, progress=False, **settings)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke test")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 3, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    size, channels, jitters = (64, 64, 4) if quick else (224, 384, 10)
    steps = args.steps or (2 if quick else 3)
    repeats = args.repeats or (1 if quick else 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = PatchBackbone(channels).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    common = {"n_jitters": jitters, "kernel_size": 29, "pca_dim": 128}
    paths = {
        "plain (preset paper: fresh views, jitter then pool)": {"preset": "paper", **common},
        "+ view bank (64 views, computed once)": {"preset": "paper", "bank_size": 64, **common},
        "+ fused jitter + pooling": {"preset": "paper", "bank_size": 64, "fused": True, **common},
        "+ channel dropout (fast path)": {
            "preset": "paper",
            "bank_size": 64,
            "fused": True,
            "dropout_mode": "channel",
            **common,
        },
        "default preset (its own downsampler settings)": {"n_jitters": jitters, "pca_dim": 128},
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, settings in paths.items():
            times[name] += step_times(backbone, image, steps, settings)
    plain = statistics.median(times[next(iter(paths))])
    rows = []
    for name, settings in paths.items():
        med = statistics.median(times[name])
        rows.append(
            {
                "path": name,
                "median_step_s": med,
                "speedup_vs_plain": plain / med,
                "setup_s": setup_time(backbone, image, settings),
                "steps_timed": len(times[name]),
            }
        )
    print(f"fit_implicit step time, {size} px, {channels} channels, {jitters} jitters, kernel 29, PCA 128")
    print(
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {repeats} repeats)\n"
    )
    print("| path | median step (s) | speed-up vs plain | one-off set-up + 1 step (s) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['path']} | {r['median_step_s']:.3f} | {r['speedup_vs_plain']:.1f}x | {r['setup_s']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"size": size, "channels": channels, "n_jitters": jitters, "rows": rows}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
