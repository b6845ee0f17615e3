"""``featup train-jbu``: train a JBU upsampler for a backbone on a folder of images (torchrun-ready).

    featup train-jbu --images photos/ --backbone dinov2_vits14 --steps 2000 --out jbu.safetensors
    torchrun --nproc_per_node 8 -m featup.eval.cli train-jbu --images 'data/**/*.jpg' \\
        --backbone vit_small_patch16_224 --checkpoint-dir runs/vit --resume

Under torchrun every rank runs this command; ``featup.core.train_jbu`` joins the process group, wraps the
trainable modules in DistributedDataParallel and gives each rank its own shard of the images. Only rank 0
writes the final file and prints the summary. This module also holds the helpers ``fit-implicit`` shares:
finding images, loading them, and resolving a backbone name.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from featup.eval.devices import add_device_argument
from featup.eval.errors import UsageError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "find_images",
    "load_image",
    "rank_and_world",
    "register",
    "resolve_backbone",
    "run",
    "training_kwargs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

#: earlier spellings of ``--precision`` values, still accepted so existing scripts keep working
_PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def find_images(spec: str) -> tuple[Path, list[Path]]:
    """Image files named by a file, a folder (searched recursively) or a glob pattern, sorted.

    Returns:
        (root, files): the folder names are relative to (the file's folder, the folder, or the glob's fixed
        prefix) and the files.

    Raises:
        UsageError: nothing matches, or a named file is not an image.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        root = path
    elif path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"expected an image file ({', '.join(IMAGE_SUFFIXES)}), got {spec}")
        files, root = [path], path.parent
    else:
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        fixed = spec.split("*")[0].split("?")[0].split("[")[0]
        root = Path(fixed) if fixed.endswith(os.sep) else Path(fixed).parent
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {spec!r}")
    return root, files


def load_image(path: str | os.PathLike, size: int | None, *, square: bool) -> torch.Tensor:
    """Read an image as RGB in [0, 1]; shorter side resized to ``size`` (antialiased), cropped if ``square``.

    Shape:
        - output: (3, H, W); (3, size, size) when ``square``
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None
    x = array.view(h, w, 3).permute(2, 0, 1).float().div(255.0)
    if size is not None:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        if new != (h, w):
            x = F.interpolate(x[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
            x = x.clamp(0.0, 1.0)  # antialiased bilinear can overshoot slightly
        if square:
            top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
            x = x[:, top : top + size, left : left + size]
    return x.contiguous()


class ImageFolder(Dataset):
    """Map-style dataset of square RGB images in [0, 1], read lazily (``train_jbu`` shards it over ranks).

    Shape:
        - item: (3, size, size)
    """

    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files = list(files)
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.size, square=True)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise UsageError(f"expected integer RANK and WORLD_SIZE from torchrun, got {exc}") from None


def resolve_backbone(name: str, weights: str | None, pretrained: bool, device: torch.device) -> Callable:
    """A frozen backbone ``(B,3,H,W) -> (B,C,h,w)`` on ``device``: a registered name or ``synthetic_a|b``.

    Same names and messages as ``featup upsample`` (``featup.eval.commands._common``); ``pretrained=False``
    without ``weights`` gives randomly initialised weights (smoke runs and tests on machines offline).
    """
    from featup.eval.commands._common import SYNTHETIC_BACKBONES
    from featup.eval.commands._common import resolve_backbone as resolve_named

    if pretrained or weights is not None or name in SYNTHETIC_BACKBONES:
        return resolve_named(name, weights, str(device))
    from featup.backbones import create_backbone, list_backbones

    known = list_backbones()
    if name not in known:
        raise UsageError(f"unknown backbone {name!r}; expected one of {[*known, *SYNTHETIC_BACKBONES]}")
    return create_backbone(name, pretrained=False).to(device).eval()


def _device(spec: str | None) -> torch.device:
    """``--device`` resolved by the shared helper (default: torchrun's local GPU, else GPU 0, else cpu)."""
    from featup.eval.devices import command_device

    return command_device(argparse.Namespace(device=spec))


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments ``train-jbu`` and ``fit-implicit`` share."""
    p.add_argument("--backbone", required=True, help="registered backbone name, or synthetic_a / synthetic_b")
    p.add_argument("--weights", help="local backbone weights (.safetensors); default: the pretrained weights")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests, smoke runs)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000, Table 7)")
    p.add_argument("--size", type=int, default=224, help="image load size, shorter side in px (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    add_device_argument(p)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument(
        "--precision",
        type=lambda s: _PRECISION_ALIASES.get(s, s),
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="autocast dtype of the training forward passes; parameters, optimizer state and the loss stay "
        "float32, float16 scales the loss (default float32; a run resumes only in its own precision)",
    )
    p.add_argument(
        "--no-uncertainty",
        action="store_true",
        help="compare the views with a plain mean squared error instead of eq. 1's learned per-pixel scale",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def training_kwargs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``train_jbu`` / ``fit_implicit`` that both commands take from the same options
    (``n_jitters`` and ``kernel_size`` are options of both, with each command's own default)."""
    return {
        "n_jitters": args.n_jitters,
        "lr": args.lr,
        "kernel_size": args.kernel_size,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "device": device,
        "precision": args.precision,
        "uncertainty": not args.no_uncertainty,
    }


def check_common(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UsageError(f"expected --steps >= 1, got {args.steps}")
    if args.size < 16:
        raise UsageError(f"expected --size >= 16 px, got {args.size}")
    if args.checkpoint_every < 1:
        raise UsageError(f"expected --checkpoint-every >= 1, got {args.checkpoint_every}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-jbu",
        help="train a JBU upsampler on a folder of images (runs under torchrun)",
        description="Train FeatUp's JBU upsampler for a frozen backbone with the multi-view loss. "
        "Under torchrun each rank trains on its own shard (DDP); rank 0 writes the files.",
    )
    p.add_argument("--images", required=True, help="image folder (recursive), image file, or glob pattern")
    add_backbone_arguments(p)
    p.add_argument("--batch-size", type=int, default=4, help="images per step and rank (default 4)")
    p.add_argument("--n-jitters", type=int, default=2, help="jittered views per image (default 2)")
    p.add_argument("--proj-dim", type=int, default=30, help="random projection width (default 30)")
    p.add_argument("--downsampler", choices=("attention", "simple"), default="attention")
    p.add_argument("--kernel-size", type=int, default=16, help="downsampler kernel (default 16)")
    p.add_argument(
        "--out",
        help="final JBUStack checkpoint (default: CHECKPOINT_DIR/jbu_stack.safetensors, "
        "else jbu_stack.safetensors)",
    )
    p.add_argument("--checkpoint-dir", help="folder for the resumable training state")
    p.add_argument("--resume", action="store_true", help="continue the run stored in --checkpoint-dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featup.core.training import train_jbu

    check_common(args)
    if args.batch_size < 1:
        raise UsageError(f"expected --batch-size >= 1, got {args.batch_size}")
    rank, world = rank_and_world()
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.resume and ckpt_dir is None:
        raise UsageError("--resume needs --checkpoint-dir (the folder holding the run to continue)")
    if ckpt_dir is not None and not args.resume and any(ckpt_dir.glob("train_state*.safetensors")):
        raise UsageError(
            f"{ckpt_dir} already holds a training run; pass --resume to continue it or use another "
            "--checkpoint-dir"
        )
    out = Path(args.out) if args.out else (ckpt_dir or Path(".")) / "jbu_stack.safetensors"
    if out.suffix != ".safetensors":
        out = out.with_suffix(out.suffix + ".safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"expected --out to be a file path, got the folder {out}")
    _, files = find_images(args.images)
    device = _device(args.device)
    backbone = resolve_backbone(args.backbone, args.weights, not args.no_pretrained, device)
    dataset = ImageFolder(files, args.size)
    dataset[0]  # fail early, with the file's name, on an unreadable first image

    start = time.perf_counter()
    up = train_jbu(
        backbone,
        dataset,
        args.steps,
        batch_size=args.batch_size,
        proj_dim=args.proj_dim,
        downsampler=args.downsampler,
        checkpoint_dir=ckpt_dir,
        resume=args.resume,
        progress=not args.quiet and rank == 0,
        **training_kwargs(args, device),
    )
    elapsed = time.perf_counter() - start
    if rank == 0:
        extra = {
            "backbone": args.backbone,
            "images": len(files),
            "steps": args.steps,
            "size": args.size,
            "world_size": world,
            "precision": args.precision,
            "uncertainty": not args.no_uncertainty,
        }
        path = up.save(out, extra=extra)
        n_params = sum(p.numel() for p in up.parameters())
        print(
            f"trained JBU upsampler ({n_params} parameters) on {len(files)} images for {args.steps} steps "
            f"x {world} process(es) in {elapsed:.1f}s -> {path}",
            file=sys.stdout,
        )
    return 0
