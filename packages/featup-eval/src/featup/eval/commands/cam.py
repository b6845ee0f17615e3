"""``featup cam``: CAM faithfulness (Average Drop / Average Increase) of every upsampler (Table 1)."""

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
        "cam",
        help="CAM faithfulness: Average Drop and Average Increase per upsampler (Table 1)",
        description="Train a linear classifier on max-pooled features of DATA/<train-split>, pick correctly "
        "classified validation images, build CAMs from each method's upsampled features, keep the top "
        "50%% of CAM values, blur the rest and compare softmax confidences (section 6.10). DATA is an "
        "ImageNet-style folder: <split>/<class>/<image>.",
    )
    p.add_argument("data", help="ImageNet-style folder with train/ and val/ class sub-folders")
    add_backbone_args(p)
    g = p.add_argument_group("data and classifier")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--max-train-images", type=int)
    g.add_argument("--max-images", type=int, default=2000, help="validation images scored (paper: 2000)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--classifier-epochs", type=int, default=10)
    g.add_argument("--classifier-lr", type=float, default=1e-3)
    g.add_argument(
        "--keep", type=float, default=0.5, help="fraction of CAM values kept unblurred (paper: 0.5)"
    )
    g.add_argument(
        "--blur-sigma", type=float, help="Gaussian blur sigma in px (default 10 px at 224 px, scaled)"
    )
    add_method_args(p)
    add_run_args(p, "featup-cam")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featup.eval.cam import cam_table, run_cam

    check_data(args.data, "ImageNet-style")
    if not 0 < args.keep < 1:
        raise UsageError(f"expected 0 < --keep < 1, got {args.keep}")
    if args.max_images < 1 or args.batch_size < 1 or args.classifier_epochs < 1:
        raise UsageError("expected --max-images, --batch-size and --classifier-epochs >= 1")
    results = run_cam(
        args.backbone,
        args.data,
        args.out,
        max_images=args.max_images,
        classifier_epochs=args.classifier_epochs,
        classifier_lr=args.classifier_lr,
        keep=args.keep,
        sigma=args.blur_sigma,
        **table1_kwargs(args),
    )
    return finish(
        "CAM faithfulness (Table 1)",
        cam_table(results),
        results,
        Path(args.out) / "cam_results.json",
        args.json,
    )
