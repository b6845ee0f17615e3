"""``featup demo``: FeatUp end to end, offline, in a few minutes on a laptop CPU.

Without images it runs the synthetic benchmark (trains a JBU, fits the implicit upsampler per scene, scores
every upsampler against the known ideal features), prints its rows and writes ``featup-demo.png``:
image | low-res PCA | bilinear | JBU | implicit | ground truth. With images and ``--backbone NAME`` (weights
from the network or ``--weights PATH``) it trains a JBU on those photos and fits the implicit upsampler on the
first one instead.
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
        help="offline demo: train a JBU and fit an implicit upsampler, write featup-demo.png",
        description="Offline by default (synthetic scenes). With IMAGE... and --backbone NAME (plus network "
        "or "
        "--weights PATH) it runs on your photos.",
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
            "--backbone/--weights are for photos: pass IMAGE... too (or drop them for the synthetic demo)"
        )
    return _synthetic(args, out)
