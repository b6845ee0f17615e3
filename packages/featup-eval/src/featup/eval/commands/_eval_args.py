"""Arguments shared by ``featup probe`` and ``featup cam`` (backbone, Table 1 methods, run control)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from featup.eval._io import write_json
from featup.eval.devices import add_device_argument, command_device
from featup.eval.errors import UsageError
from featup.eval.methods import METHODS, MethodConfig

__all__ = [
    "add_backbone_args",
    "add_method_args",
    "add_run_args",
    "check_data",
    "finish",
    "method_config",
    "table1_kwargs",
]


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--backbone",
        default="vit_small_patch16_224",
        help="registry name (see featup.backbones.list_backbones) or module.path:factory "
        "(e.g. featup.eval.fixtures:tiny_backbone); default %(default)s (the paper's ViT-S/16)",
    )
    g.add_argument("--weights", help="local weights file for the backbone (safetensors)")
    g.add_argument(
        "--pretrained", action="store_true", help="load the published backbone weights (needs network)"
    )


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods (Table 1)")
    g.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated subset of {','.join(METHODS)} or 'all' (bilinear is always included)",
    )
    g.add_argument("--train-steps", type=int, default=2000, help="train_jbu steps of the learned upsamplers")
    g.add_argument("--train-batch-size", type=int, default=4, help="images per upsampler training step")
    g.add_argument("--implicit-steps", type=int, default=2000, help="fit_implicit steps per image")
    g.add_argument("--dip-steps", type=int, default=2000, help="Deep Image Prior steps per image")
    g.add_argument("--n-jitters", type=int, default=10, help="jittered views per step of the per-image fits")
    g.add_argument(
        "--strided-factor", type=int, default=8, help="patch-stride divisor of the strided baseline"
    )
    g.add_argument(
        "--large-factor", type=int, default=8, help="image enlargement of the large-image baseline"
    )
    g.add_argument("--jbu-checkpoint", help="use this trained JBUStack (.safetensors, or an original .ckpt)")


def add_run_args(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        default=out_default,
        help="working folder: caches, checkpoints, results (default %(default)s)",
    )
    g.add_argument("--json", help="also write the results JSON here")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-resume", action="store_true", help="ignore what an earlier run left in --out")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device_argument(g)
    add_workers_argument(g)


def add_workers_argument(group: Any) -> None:
    group.add_argument(
        "--workers", type=int, default=0, metavar="N", help="DataLoader processes decoding images (default 0)"
    )


def method_config(args: argparse.Namespace) -> MethodConfig:
    for name in (
        "train_steps",
        "train_batch_size",
        "implicit_steps",
        "dip_steps",
        "n_jitters",
        "strided_factor",
        "large_factor",
    ):
        if getattr(args, name) < 1:
            raise UsageError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    if args.jbu_checkpoint is not None and not Path(args.jbu_checkpoint).is_file():
        raise UsageError(f"--jbu-checkpoint {args.jbu_checkpoint} does not exist")
    return MethodConfig(
        train_steps=args.train_steps,
        batch_size=args.train_batch_size,
        implicit_steps=args.implicit_steps,
        dip_steps=args.dip_steps,
        n_jitters=args.n_jitters,
        strided_factor=args.strided_factor,
        large_factor=args.large_factor,
        jbu_checkpoint=args.jbu_checkpoint,
        seed=args.seed,
    )


def table1_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``run_probes`` / ``run_cam`` that both commands take from the same options
    (the data options are each command's own, with its defaults); validates the method options."""
    return {
        "methods": args.methods,
        "weights": args.weights,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "train_split": args.train_split,
        "val_split": args.val_split,
        "max_train_images": args.max_train_images,
        "batch_size": args.batch_size,
        "method_cfg": method_config(args),
        "resume": not args.no_resume,
        "progress": not args.no_progress,
        **device_kwargs(args),
    }


def device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``device`` and ``num_workers`` of the evaluation commands, checked."""
    if args.workers < 0:
        raise UsageError(f"expected --workers >= 0, got {args.workers}")
    return {"device": command_device(args), "num_workers": args.workers}


def check_data(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"{what} folder {path} does not exist")


def finish(title: str, table: str, results: dict[str, Any], results_path: Path, json_path: str | None) -> int:
    """Print the table and where the JSON is; copy the JSON to ``--json`` if asked."""
    print(f"## {title}\n\n{table}\n")
    if json_path:
        write_json(json_path, results)
        print(f"results: {results_path} (also {json_path})")
    else:
        print(f"results: {results_path}")
    sys.stdout.flush()
    return 0
