"""``featup similarity IMAGE --point X,Y``: where else does this point's feature appear? Bilinear vs FeatUp.

The paper's small-object retrieval (supplement 6.9): the feature at a query point is compared (cosine) with
every pixel of a target image (the query image itself by default), once with bilinearly upsampled features and
once with FeatUp's; the heatmaps are shown side by side with each best match marked.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from featup.eval.commands._common import add_model_options, build_featurizer
from featup.eval.errors import UsageError

__all__ = ["register", "run", "similarity_map"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "similarity",
        help="similarity heatmaps of a query point, bilinear beside FeatUp",
        description="Compare the feature at --point X,Y (pixels of IMAGE after --size) with every pixel of "
        "--target (default IMAGE itself), using bilinear and FeatUp upsampling; writes OUT/similarity.png "
        "(query | bilinear heatmap | FeatUp heatmap, red = similar, x = best match) and the maps as "
        "safetensors.",
    )
    p.add_argument("image", metavar="IMAGE", help="query image")
    p.add_argument("--point", required=True, metavar="X,Y", help="query point in pixels (x right, y down)")
    p.add_argument("--target", metavar="IMAGE2", help="image to search (default: IMAGE)")
    add_model_options(p)
    p.add_argument("--out", default="featup-out", metavar="DIR", help="output folder (default featup-out)")
    p.set_defaults(func=run)


def similarity_map(query: torch.Tensor, x: float, y: float, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``query[:, :, y, x]`` with every pixel of ``target``.

    Shape:
        - query: (1, C, H, W); target: (1, C, H2, W2); output: (H2, W2)
    """
    h, w = query.shape[-2:]
    if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
        raise UsageError(f"expected --point inside the {w}x{h} (WxH) query image, got {x:g},{y:g}")
    vec = query[0, :, int(round(y)), int(round(x))]
    return F.cosine_similarity(target[0], vec.view(-1, 1, 1), dim=0, eps=1e-8)


def _argmax_xy(sim: torch.Tensor) -> tuple[int, int]:
    idx = int(sim.flatten().argmax())
    return idx % sim.shape[1], idx // sim.shape[1]


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save as st_save

    from featup.core.checkpoint import atomic_write_bytes
    from featup.eval.devices import command_device
    from featup.eval.images import ensure_writable_dir, load_image, parse_point, parse_size, save_png
    from featup.eval.panels import heatmap_rgb, mark_point, tile_row

    command_device(args)
    size = parse_size(args.size) if args.size else None
    px, py = parse_point(args.point)
    query_img = load_image(args.image, size).to(args.device)
    target_img = load_image(args.target, size).to(args.device) if args.target else query_img
    h, w = query_img.shape[-2:]
    if not (0 <= px <= w - 1 and 0 <= py <= h - 1):
        raise UsageError(f"expected --point inside the {w}x{h} (WxH) query image, got {args.point}")
    out = ensure_writable_dir(args.out)
    feat = build_featurizer(args)

    q_lr, q_hr = feat(query_img)
    if args.target:
        t_lr, t_hr = feat(target_img)
    else:
        t_lr, t_hr = q_lr, q_hr
    sim_bil = similarity_map(feat.bilinear(q_lr, query_img), px, py, feat.bilinear(t_lr, target_img))
    sim_up = similarity_map(q_hr, px, py, t_hr)
    tiles = [("query", mark_point(query_img[0].cpu(), px, py))]
    for name, sim in (("bilinear", sim_bil), (feat.upsampler_name, sim_up)):
        bx, by = _argmax_xy(sim)
        blend = 0.5 * target_img[0].cpu() + 0.5 * heatmap_rgb(sim.cpu())
        tiles.append((name, mark_point(blend, bx, by)))
        print(
            f"{name}: best match at x={bx}, y={by} (cosine {float(sim.max()):.3f}, "
            f"mean {float(sim.mean()):.3f})"
        )
    save_png(out / "similarity.png", tile_row(tiles, tuple(target_img.shape[-2:])))
    maps = {"bilinear": sim_bil.cpu().contiguous(), "featup": sim_up.cpu().contiguous()}
    atomic_write_bytes(out / "similarity.safetensors", st_save(maps, metadata={"point": args.point}))
    print(f"wrote {out / 'similarity.png'} and {out / 'similarity.safetensors'}")
    return 0
