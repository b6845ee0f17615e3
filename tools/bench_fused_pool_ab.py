"""Fused pooling (``pool_views(..., fused=True)``) forward + backward of two versions of featup-core.

Both versions in ONE process, interleaved (the CPU's speed moves between runs), at Table 7's settings:
128 PCA channels + the magnitude channel of a 224 x 224 map, 10 jitters of the paper preset (zoom <= 1.8,
pad 30, flips), output 14 x 14; the attention downsampler in training mode (its salience dropout) or the
simple one. "after" runs with a workspace kept between calls (as a fit does) and with fresh memory, and its
tile path (``POOL_METHOD = "tiles"``); ``--no-extra`` leaves the magnitude channel out (a fit with
``mag_weight = 0``, Table 7's)::

    mkdir -p /tmp/before && git archive <base-commit> packages | tar -x -C /tmp/before
    python tools/bench_fused_pool_ab.py --before /tmp/before --downsampler attention --kernel 29
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "featup-core" / "src"))
sys.path.insert(0, str(ROOT / "tools"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="tree of the version to compare against")
    parser.add_argument("--downsampler", choices=["attention", "simple"], default="attention")
    parser.add_argument("--kernel", type=int, default=29)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--no-extra",
        action="store_true",
        help="no magnitude channel (128 channels, as a fit with mag_weight 0)",
    )
    args = parser.parse_args(argv)
    import torch
    from bench_perf_implicit_ab import import_before

    import featup.core.implicit_fit as after
    from featup.core.downsamplers import create_downsampler
    from featup.core.jitter import sample_jitter

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        import_before(args.before, Path(tmp))
        import featup_before.core.implicit_fit as before

        torch.manual_seed(0)
        down = create_downsampler(args.downsampler, 128, args.kernel).train()
        gen = torch.Generator().manual_seed(1)
        cfg = after.ImplicitFitConfig.from_preset("paper")
        jitters = [sample_jitter(gen, max_pad=cfg.max_pad, max_zoom=cfg.max_zoom) for _ in range(10)]
        hr = torch.randn(1, 224, 224, 128).permute(0, 3, 1, 2).requires_grad_()  # channels-last, as a fit's
        workspace: dict[str, torch.Tensor] = {}

        def run(mod, **kw) -> None:
            extra = None if args.no_extra else hr.norm(dim=1, keepdim=True)
            out = mod.pool_views(down, hr, extra, jitters, (14, 14), fused=True, **kw)
            out.square().sum().backward()
            hr.grad = None
            down.zero_grad(set_to_none=True)

        def run_tiles() -> None:  # this tree's tile path (POOL_METHOD = "tiles"), with the workspace
            method = after.POOL_METHOD
            after.POOL_METHOD = "tiles"
            try:
                run(after, workspace=tile_workspace)
            finally:
                after.POOL_METHOD = method

        tile_workspace: dict[str, torch.Tensor] = {}
        paths = {
            "before": lambda: run(before),
            "after, workspace": lambda: run(after, workspace=workspace),
            "after, fresh memory": lambda: run(after),
            "after, tile path": run_tiles,
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(args.repeats + 1):
            for name, fn in paths.items():
                start = time.process_time()
                fn()
                if rep:  # the first round warms up
                    times[name].append(time.process_time() - start)
    print(
        f"fused pooling forward + backward, {args.downsampler} k{args.kernel}, CPU time, median of {args.repeats}"
    )
    base = statistics.median(times["before"])
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} ms | {statistics.median(ts) / base:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
