"""How far float32 rounding alone moves a fit_implicit loss curve: the fused pooling's ways of summing.

Runs the same fit (Table 7's fast-path settings: 224 px, 384-channel stride-16 patch backbone, 10 jitters,
attention downsampler k29, PCA 128, view bank, fused pooling, channel dropout; same seed) with
``featup.core.implicit_fit.POOL_METHOD`` / ``POOL_ROW_STEP`` / ``POOL_COL_STEP`` switched, in one process, and
prints each curve's relative difference from the reference (the tile path at its default (16, 64) steps).
Every variant computes the same function (float64 tests: 1e-12); they differ only in the order of float32
additions, so the tile path at other steps is the control for the size of a pure-rounding difference::

    python tools/implicit_pool_rounding.py --steps 15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "featup-core" / "src"))
sys.path.insert(0, str(ROOT / "tools"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    import torch
    from bench_perf_implicit import PatchBackbone

    import featup.core.implicit_fit as fit_mod

    torch.set_num_threads(1)
    fast = {"preset": "paper", "bank_size": 64, "fused": True, "dropout_mode": "channel"}
    fast.update(n_jitters=10, kernel_size=29, pca_dim=128)
    variants = {
        "tiles (16, 64) [reference]": ("tiles", 16, 64),
        "tiles (8, 32) [rounding control]": ("tiles", 8, 32),
        "tiles (32, 224) [rounding control]": ("tiles", 32, 224),
        "sparse (CSR)": ("sparse", 16, 64),
    }
    backbone = PatchBackbone(384).eval()
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    defaults = (fit_mod.POOL_METHOD, fit_mod.POOL_ROW_STEP, fit_mod.POOL_COL_STEP)
    curves, renders = {}, {}
    try:
        for name, (method, row_step, col_step) in variants.items():
            fit_mod.POOL_METHOD, fit_mod.POOL_ROW_STEP, fit_mod.POOL_COL_STEP = method, row_step, col_step
            losses: list[float] = []
            imp = fit_mod.fit_implicit(
                backbone,
                image,
                args.steps,
                progress=False,
                callback=lambda step, logs, out=losses: out.append(float(logs["loss"])),
                **fast,
            )
            curves[name] = torch.tensor(losses, dtype=torch.float64)
            renders[name] = imp.render()
    finally:
        fit_mod.POOL_METHOD, fit_mod.POOL_ROW_STEP, fit_mod.POOL_COL_STEP = defaults
    ref = next(iter(variants))
    print(f"relative loss difference from {ref}, per step (1..{args.steps}); largest; rendered features")
    for name in variants:
        rel = (curves[name] - curves[ref]).abs() / curves[ref].abs()
        render = (renders[name] - renders[ref]).abs().max() / renders[ref].abs().max()
        steps = " ".join(f"{x:.0e}" for x in rel.tolist())
        print(f"| {name} | {steps} | {rel.max():.2e} | {render:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
