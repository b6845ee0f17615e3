"""``featup upsample IMAGE...``: high-resolution features of images, saved as safetensors plus a PCA panel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featup.eval.commands._common import add_model_options, build_featurizer, unique_stems
from featup.eval.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upsample",
        help="upsample a backbone's features of images (safetensors + PCA panel PNG)",
        description="Featurize each IMAGE with a backbone, upsample the features to the image size, "
        "and write "
        "OUT/<name>.safetensors (lr_feats (1,C,h,w), hr_feats (1,C,H,W)) and OUT/<name>.png "
        "(image | low-res PCA | upsampled PCA). Example: featup upsample photo.jpg --pretrained dino16",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    add_model_options(p)
    p.add_argument("--out", default="featup-out", metavar="DIR", help="output folder (default featup-out)")
    p.add_argument(
        "--tile",
        type=int,
        metavar="N",
        help="upsample in N x N px tiles (bounded memory at any "
        "size; same result up to rounding); the implicit upsampler renders in chunks anyway",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save as st_save
    from tqdm import tqdm

    from featup.core.checkpoint import atomic_write_bytes
    from featup.eval.devices import command_device
    from featup.eval.images import ensure_writable_dir, load_image, parse_size, save_png
    from featup.eval.panels import feature_panel

    command_device(args)
    size = parse_size(args.size) if args.size else None
    images = [load_image(p, size) for p in args.images]  # every input is checked before any work starts
    out = ensure_writable_dir(args.out)
    feat = build_featurizer(args)
    if args.tile is not None:
        if args.tile < 1:
            raise UsageError(f"expected --tile N >= 1 px, got {args.tile}")
        if feat.upsampler is not None:
            from functools import partial

            from featup.core.tiling import tiled_upsample

            feat.upsampler = partial(tiled_upsample, feat.upsampler, tile=args.tile)
    stems = unique_stems(args.images)
    bar = tqdm(
        list(zip(args.images, stems, images)),
        desc="upsample",
        unit="img",
        disable=feat.progress is False or len(images) == 1,
    )
    for path, stem, image in bar:
        image = image.to(args.device)
        lr, hr = feat(image)
        meta = {
            "image": str(path),
            "backbone": str(args.pretrained or args.backbone),
            "upsampler": feat.upsampler_name,
            "lr_shape": json.dumps(list(lr.shape)),
            "hr_shape": json.dumps(list(hr.shape)),
        }
        tensors = {"lr_feats": lr.detach().cpu().contiguous(), "hr_feats": hr.detach().cpu().contiguous()}
        atomic_write_bytes(out / f"{stem}.safetensors", st_save(tensors, metadata=meta))
        panel = feature_panel(image.cpu(), lr.cpu(), [(feat.upsampler_name, hr.cpu())])
        save_png(out / f"{stem}.png", panel)
        print(
            f"{path}: {tuple(lr.shape[1:])} -> {tuple(hr.shape[1:])}  "
            f"wrote {Path(out, stem)}.safetensors/.png"
        )
    return 0
