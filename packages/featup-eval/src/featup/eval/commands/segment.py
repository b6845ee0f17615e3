"""``featup segment``: end-to-end SegFormer on ADE20K with each decoder upsampler (Table 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from featup.eval.commands._eval_args import add_workers_argument, check_data, device_kwargs, finish
from featup.eval.devices import add_device_argument
from featup.eval.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from featup.eval.segmentation import DECODER_UPSAMPLERS, MIT_VARIANTS

    p = subparsers.add_parser(
        "segment",
        help="end-to-end SegFormer on ADE20K per decoder upsampler: mIoU/mAcc/aAcc, params, GFLOPs (Table 2)",
        description="Train SegFormer (MiT encoder, all-MLP decoder) on DATA/images/training with each "
        "decoder "
        "upsampler, evaluate on DATA/images/validation, and count added parameters and GFLOPs "
        "(multiply-adds, FlopCounterMode). DATA is an ADEChallengeData2016 folder.",
    )
    p.add_argument("data", help="ADE20K root (ADEChallengeData2016: images/ and annotations/)")
    p.add_argument(
        "--upsamplers",
        default="all",
        help=f"comma-separated subset of {','.join(DECODER_UPSAMPLERS)} or 'all' (bilinear always included)",
    )
    p.add_argument(
        "--variant", default="b1", choices=sorted(MIT_VARIANTS), help="MiT encoder size (default b1)"
    )
    p.add_argument("--embed-dim", type=int, default=256, help="decoder width")
    p.add_argument(
        "--encoder-weights", help="safetensors state dict for the MiT encoder (e.g. ImageNet-pretrained)"
    )
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=160_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=6e-5)
    p.add_argument("--flops-size", type=int, default=512, help="square input size for the GFLOPs count")
    p.add_argument("--max-train-images", type=int)
    p.add_argument("--max-val-images", type=int)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--out", default="featup-segment")
    p.add_argument("--json", help="also write the results JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_device_argument(p)
    add_workers_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featup.eval.segmentation import run_segmentation, segmentation_table

    check_data(args.data, "ADE20K")
    for name in ("crop_size", "steps", "batch_size", "flops_size", "embed_dim", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    if args.encoder_weights is not None and not Path(args.encoder_weights).is_file():
        raise UsageError(f"--encoder-weights {args.encoder_weights} does not exist")
    results = run_segmentation(
        args.data,
        args.out,
        upsamplers=args.upsamplers,
        variant=args.variant,
        embed_dim=args.embed_dim,
        crop_size=args.crop_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        flops_size=args.flops_size,
        encoder_weights=args.encoder_weights,
        max_train_images=args.max_train_images,
        max_val_images=args.max_val_images,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        progress=not args.no_progress,
        **device_kwargs(args),
    )
    return finish(
        "End-to-end segmentation (Table 2)",
        segmentation_table(results),
        results,
        Path(args.out) / "segment_results.json",
        args.json,
    )
