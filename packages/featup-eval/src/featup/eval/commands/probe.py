"""``featup probe``: the linear-probe columns of Table 1 (COCO-Stuff segmentation, pseudo-depth)."""

from __future__ import annotations

import argparse
from pathlib import Path

from featup.eval.commands._eval_args import (
    add_backbone_args,
    add_method_args,
    add_run_args,
    check_data,
    finish,
    table1_kwargs,
)
from featup.eval.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear probes (segmentation mIoU/accuracy, depth RMSE/delta) on every upsampler (Table 1)",
        description="Export low-res features of the training split, train a 27-class segmentation probe and "
        "a "
        "scale-and-shift-invariant depth probe on them, then apply the frozen probes to each method's "
        "features at image resolution. DATA is a COCO-Stuff root (images/<split>, annotations/<split>, "
        "optional depth/<split>) or a depth folder (images/<split>, depth/<split>).",
    )
    p.add_argument("data", help="COCO-Stuff root or depth folder")
    add_backbone_args(p)
    g = p.add_argument_group("data and probes")
    g.add_argument("--train-split", default="train2017")
    g.add_argument("--val-split", default="val2017")
    g.add_argument(
        "--depth-dir", help="folder with <split>/<stem>.npy|png|tif depth maps (default DATA/depth)"
    )
    g.add_argument("--image-list", help="validation image ids, one per line (e.g. STEGO's curated list)")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--max-train-images", type=int)
    g.add_argument("--max-val-images", type=int)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--probe-epochs", type=int, default=10)
    g.add_argument("--probe-lr", type=float, default=1e-3)
    add_method_args(p)
    add_run_args(p, "featup-probe")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featup.eval.probes import probe_table, run_probes

    check_data(args.data, "dataset")
    if args.image_size < 8 or args.batch_size < 1 or args.probe_epochs < 1:
        raise UsageError("expected --image-size >= 8, --batch-size >= 1 and --probe-epochs >= 1")
    results = run_probes(
        args.backbone,
        args.data,
        args.out,
        depth_dir=args.depth_dir,
        image_list=args.image_list,
        max_val_images=args.max_val_images,
        probe_epochs=args.probe_epochs,
        probe_lr=args.probe_lr,
        **table1_kwargs(args),
    )
    return finish(
        "Linear probes (Table 1)",
        probe_table(results),
        results,
        Path(args.out) / "probe_results.json",
        args.json,
    )
