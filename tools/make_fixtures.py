"""Write the tiny evaluation datasets (COCO-Stuff with depth, ImageNet-style, ADE20K) in their real layouts.

Usage: python tools/make_fixtures.py OUT_DIR [--seed N]

Then try the evaluations end to end in seconds with the tiny backbone, e.g.
  featup probe OUT_DIR/cocostuff --backbone featup.eval.fixtures:tiny_backbone --image-size 48 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from featup.eval.fixtures import make_all

COMMON = (
    "--backbone featup.eval.fixtures:tiny_backbone --image-size 48 --train-steps 5 --implicit-steps 5 "
    "--dip-steps 5 --n-jitters 2 --strided-factor 2 --large-factor 2"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    roots = make_all(args.out, seed=args.seed)
    for name, root in roots.items():
        print(f"{name:10s} {root}")
    print("\ntry:")
    print(
        f"  featup probe {roots['cocostuff']} {COMMON} --probe-epochs 20 --probe-lr 0.01 "
        f"--out {args.out}/runs/probe"
    )
    print(
        f"  featup cam {roots['imagenet']} {COMMON} --classifier-epochs 30 --classifier-lr 0.01 "
        f"--out {args.out}/runs/cam"
    )
    print(
        f"  featup segment {roots['ade20k']} --variant tiny --embed-dim 16 --crop-size 32 --steps 20 "
        f"--batch-size 2 --lr 0.001 --flops-size 64 --out {args.out}/runs/segment"
    )


if __name__ == "__main__":
    main()
