"""``featup fit-implicit``: fit one implicit upsampler per image, restartable, sharded over torchrun ranks.

    featup fit-implicit photo.jpg --backbone dinov2_vits14 --out implicit/
    featup fit-implicit photo.jpg --backbone dinov2_vits14 --out implicit/ --preset paper   # Table 7
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


def _settings(args: argparse.Namespace, device) -> dict:
    """The options given on the command line (None: the preset's value)."""
    given = {
        **training_kwargs(args, device),
        "pca_dim": args.pca_dim,
        "tv_weight": args.tv_weight,
        "bank_size": args.bank_size,
        "mag_weight": args.mag_weight,
        "blur_pin": args.blur_pin,
    }
    return {k: v for k, v in given.items() if v is not None}


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
    p.add_argument(
        "--preset",
        choices=["default", "paper"],  # featup.core.implicit_fit.PRESETS (imported lazily)
        default="default",
        help="settings: 'default' (safe start, fast path) or 'paper' (Table 7: 2000 steps, for a GPU); "
        "the options below override it",
    )
    p.add_argument("--n-jitters", type=int, default=None, help="jittered views per step (preset: 10)")
    p.add_argument("--pca-dim", type=int, default=None, help="PCA components of the targets (preset: 128)")
    p.add_argument("--tv-weight", type=float, default=None, help="total-variation weight (preset: 0.05)")
    p.add_argument("--kernel-size", type=int, default=None, help="downsampler kernel (preset: 29)")
    p.add_argument("--bank-size", type=int, default=None, help="jittered views computed once (preset's)")
    p.add_argument("--mag-weight", type=float, default=None, help="magnitude regulariser weight (preset's)")
    p.add_argument("--blur-pin", type=float, default=None, help="blur-pin regulariser weight (preset's)")
    # --steps and --lr come from the preset unless given
    p.set_defaults(func=run, steps=None, lr=None)


def run(args: argparse.Namespace) -> int:
    from featup.core.implicit_fit import ImplicitFitConfig, fit_implicit

    preset = ImplicitFitConfig.from_preset(args.preset)
    args.steps = preset.steps if args.steps is None else args.steps
    args.lr = preset.lr if args.lr is None else args.lr
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
            preset=args.preset,
            checkpoint_path=state,
            resume=True,
            progress=not args.quiet,
            **_settings(args, device),
        )
        model.save(
            out_dir / f"{name}.safetensors",
            extra={
                "image": str(f),
                "index": i,
                "backbone": args.backbone,
                "steps": args.steps,
                "preset": args.preset,
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
