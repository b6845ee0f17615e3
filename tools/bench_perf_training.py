"""Step time of ``train_jbu``: the plain path against the projected-first path, as a ratio within one run.

    python tools/bench_perf_training.py                 # Table 7's settings: 224 px, batch 4, 2 jitters,
                                                        # attention downsampler, 30-d projection
    python tools/bench_perf_training.py --quick         # CI smoke: 64 px, 64 channels, 2 timed steps
    python tools/bench_perf_training.py --json out.json

The backbone is a trivial frozen patch embedding (``Conv2d(3, C, 16, stride 16)``, 384 channels by default),
so the time is the upsampler's, downsampler's and loss's, not the backbone's. "plain" is
``project_first=False`` (every step upsamples all C channels, then jitters, downsamples and projects them);
"projected first" is the default (the low-res features are projected to 30 dimensions, plus the attention
downsampler's salience channel, before upsampling). Both use one backbone call for all jittered views. Each
configuration runs ``--repeats`` times, alternating, each for ``--steps`` timed steps after one warm-up
step; the table gives the median step time and the ratio of medians. Timings on a shared machine are noisy:
read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn


def _step_times(project_first: bool, args: argparse.Namespace) -> list[float]:
    from featup.core.training import train_jbu

    torch.manual_seed(0)
    backbone = nn.Conv2d(3, args.channels, 16, 16).requires_grad_(False)
    images = torch.rand(args.batch * 2, 3, args.size, args.size)
    times: list[float] = []
    last = [time.perf_counter()]

    def callback(step: int, logs: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_jbu(
        backbone,
        images,
        steps=args.steps + 1,
        batch_size=args.batch,
        n_jitters=args.jitters,
        proj_dim=args.proj_dim,
        downsampler="attention",
        progress=False,
        project_first=project_first,
        callback=callback,
    )
    return times[1:]  # the first step carries one-off costs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--jitters", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 px, 64 channels, 2 steps, 1 repeat")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.size, args.channels, args.steps, args.repeats = 64, 64, 2, 1
    torch.set_num_threads(args.threads)

    samples: dict[str, list[float]] = {"plain": [], "projected first": []}
    for _ in range(args.repeats):
        samples["plain"] += _step_times(False, args)
        samples["projected first"] += _step_times(True, args)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["plain"] / med["projected first"]

    setting = (
        f"{args.size} px, batch {args.batch}, {args.jitters} jitters, attention downsampler, "
        f"{args.proj_dim}-d projection, {args.channels}-channel patch backbone, {args.threads} thread(s)"
    )
    print(f"train_jbu step time ({setting}; {platform.processor() or platform.machine()})\n")
    print("| path | median step (s) | steps timed | speed-up vs plain |")
    print("|---|---:|---:|---:|")
    for name, values in samples.items():
        print(f"| {name} | {med[name]:.3f} | {len(values)} | {med['plain'] / med[name]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"setting": vars(args), "step_seconds": samples, "median": med, "ratio": ratio}, f, indent=2
            )


if __name__ == "__main__":
    main()
