"""fit_implicit loss curves of two versions of featup-core, same seed, at Table 7's fast-path settings.

The check that a faster path computes the same fit (float32 rounding): both versions run the same fit
(224 px, 384-channel stride-16 patch backbone, 10 jitters, attention downsampler k29, PCA 128, view bank,
fused pooling, channel dropout) in one process; prints both curves, their largest relative difference
and that of the rendered features::

    mkdir -p /tmp/before && git archive <base-commit> packages | tar -x -C /tmp/before
    python tools/implicit_curves_ab.py --before /tmp/before --steps 15
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packages" / "featup-core" / "src"))
sys.path.insert(0, str(ROOT / "tools"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="tree of the version to compare against")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    import torch
    from bench_perf_implicit import PatchBackbone
    from bench_perf_implicit_ab import import_before

    import featup.core as after

    torch.set_num_threads(1)
    fast = {"preset": "paper", "bank_size": 64, "fused": True, "dropout_mode": "channel"}
    fast.update(n_jitters=10, kernel_size=29, pca_dim=128)
    with tempfile.TemporaryDirectory() as tmp:
        before = import_before(args.before, Path(tmp))
        backbone = PatchBackbone(384).eval()
        image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        curves, renders = [], []
        for mod in (before, after):
            losses: list[float] = []
            imp = mod.fit_implicit(
                backbone,
                image,
                args.steps,
                progress=False,
                callback=lambda step, logs, out=losses: out.append(float(logs["loss"])),
                **fast,
            )
            curves.append(torch.tensor(losses, dtype=torch.float64))
            renders.append(imp.render())
    print("loss, before:", " ".join(f"{x:.5f}" for x in curves[0].tolist()))
    print("loss, after: ", " ".join(f"{x:.5f}" for x in curves[1].tolist()))
    rel = ((curves[1] - curves[0]).abs() / curves[0].abs()).max()
    print(f"largest relative loss difference over {args.steps} steps: {rel:.2e}")
    diff = (renders[1] - renders[0]).abs().max() / renders[0].abs().max()
    print(f"rendered features after the fit, largest difference / largest value: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
