"""``featup fit-implicit``: fit one implicit upsampler per image, restartable, sharded over torchrun ranks.

    featup fit-implicit photo.jpg --backbone dinov2_vits14 --out implicit/
    torchrun --nproc_per_node 4 -m featup.eval.cli fit-implicit photos/ --backbone dinov2_vits14 \
        --out implicit/

Images are sorted; rank ``r`` of ``W`` fits images ``i`` with ``i % W == r`` (no process group is needed:
the fits are independent). Each result is ``OUT/<name>.safetensors`` (``ImplicitUpsampler.load``-able, written
atomically), where ``<name>`` is the image's path relative to the input folder without its suffix and with
``/`` replaced by ``__``. An image whose result exists is skipped, so an interrupted job is rerun with the
same command; a fit interrupted mid-way resumes from ``OUT/.partial/<name>.state.safetensors``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from featup.eval.commands.train_jbu import (
    _device,
    add_backbone_arguments,
    check_common,
    find_images,
    load_image,
    rank_and_world,
    resolve_backbone,
    training_kwargs,
)
from featup.eval.errors import UsageError

__all__ = ["output_names", "register", "run"]


def output_names(root: Path, files: list[Path]) -> list[str]:
    """One result name per image: its path under ``root`` without suffix, folders joined by ``__``.

    Raises:
        UsageError: two images map to one name (e.g. ``cat.png`` and ``cat.jpg``).
    """
    names = []
    for f in files:
        try:
            rel = f.relative_to(root)
        except ValueError:
            rel = Path(f.name)
        names.append("__".join(rel.with_suffix("").parts))
    seen: dict[str, Path] = {}
    for name, f in zip(names, files):
        if name in seen:
            raise UsageError(
                f"images {seen[name]} and {f} would both be saved as {name}.safetensors; rename one"
            )
        seen[name] = f
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit-implicit",
        help="fit an implicit upsampler per image (restartable; shards images over torchrun ranks)",
        description="Fit FeatUp's implicit upsampler to each image and save one model per image. "
        "Images whose result exists are skipped; under torchrun rank r takes images i with i %% world == r.",
    )
    p.add_argument("images", metavar="IMAGE_OR_DIR", help="an image, a folder (recursive) or a glob pattern")
    add_backbone_arguments(p)
    p.add_argument("--out", required=True, help="output folder, one <name>.safetensors per image")
    p.add_argument("--n-jitters", type=int, default=10, help="jittered views per step (default 10)")
    p.add_argument("--pca-dim", type=int, default=128, help="PCA components of the targets (default 128)")
    p.add_argument("--tv-weight", type=float, default=0.05, help="total-variation weight (default 0.05)")
    p.add_argument("--kernel-size", type=int, default=29, help="downsampler kernel (default 29)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from featup.core.training import fit_implicit

    check_common(args)
    rank, world = rank_and_world()
    if not 0 <= rank < world:
        raise UsageError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"expected --out to be a folder, got the file {out_dir}")
    root, files = find_images(args.images)
    names = output_names(root, files)
    mine = [(i, f, n) for i, (f, n) in enumerate(zip(files, names)) if i % world == rank]
    todo = [(i, f, n) for i, f, n in mine if not (out_dir / f"{n}.safetensors").is_file()]
    skipped = len(mine) - len(todo)
    device = _device(args.device)
    backbone = resolve_backbone(args.backbone, args.weights, not args.no_pretrained, device) if todo else None
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".partial"
    start = time.perf_counter()
    for k, (i, f, name) in enumerate(todo):
        image = load_image(f, args.size, square=False)[None].to(device)
        state = partial / f"{name}.state.safetensors"
        if not args.quiet:
            print(f"[rank {rank}] {k + 1}/{len(todo)} fitting {f}", file=sys.stderr)
        model = fit_implicit(
            backbone,
            image,
            args.steps,
            pca_dim=args.pca_dim,
            tv_weight=args.tv_weight,
            checkpoint_path=state,
            resume=True,
            progress=not args.quiet,
            **training_kwargs(args, device),
        )
        model.save(
            out_dir / f"{name}.safetensors",
            extra={
                "image": str(f),
                "index": i,
                "backbone": args.backbone,
                "steps": args.steps,
                "precision": args.precision,
                "uncertainty": not args.no_uncertainty,
            },
        )
        for leftover in (state, state.with_suffix(".json")):
            if leftover.exists():
                os.unlink(leftover)  # the result is safely written; the resumable state is no longer needed
    elapsed = time.perf_counter() - start
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(
        f"{who}fitted {len(todo)}, skipped {skipped} already done, of {len(mine)} images "
        f"({len(files)} in total) in {elapsed:.1f}s -> {out_dir}"
    )
    return 0
