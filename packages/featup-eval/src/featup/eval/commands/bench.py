"""``featup bench``: the synthetic benchmark (every upsampler vs. known ideal features), table + JSON.

``featup bench --real``: the label-free real-photo benchmark (:mod:`featup.eval.real_bench`): EfficientNet-Lite0
on the bundled evaluation photos, offline.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

__all__ = ["add_bench_options", "config_from_args", "register", "run"]


def add_bench_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--quick", action="store_true", help="tiny configuration that runs in seconds (for tests)")
    g.add_argument("--jbu-steps", type=int, metavar="N", help="train_jbu steps")
    g.add_argument(
        "--baseline-steps",
        type=int,
        metavar="N",
        help="steps for learnable baselines (default: as --jbu-steps; 0 = leave untrained)",
    )
    g.add_argument("--implicit-steps", type=int, metavar="N", help="fit_implicit steps per evaluation image")
    g.add_argument("--n-train", type=int, metavar="N", help="training scenes")
    g.add_argument("--n-eval", type=int, metavar="N", help="evaluation scenes (bench 12, demo 3)")
    g.add_argument(
        "--scene-size",
        metavar="HxW",
        help="scene size, a multiple of 112 (14 without transfer; default 112x112)",
    )
    g.add_argument("--no-transfer", action="store_true", help="skip extractor B (encoder-agnostic transfer)")
    g.add_argument("--seed", type=int, help="seed of the scenes and every run")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_real_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real-photo benchmark (--real)")
    g.add_argument(
        "--real",
        action="store_true",
        help="label-free benchmark on the bundled real photos with EfficientNet-Lite0 (offline)",
    )
    g.add_argument("--methods", metavar="A,B", help="comma-separated methods of --real (default: all)")
    g.add_argument("--window", type=int, metavar="PX", help="--real evaluation window (multiple of 32)")
    g.add_argument("--train-size", type=int, metavar="PX", help="--real training window side")
    g.add_argument("--no-mirror", action="store_true", help="--real: skip the mirrored photos")


def real_config_from_args(args: argparse.Namespace):
    from featup.eval.real_bench import RealBenchConfig

    cfg = RealBenchConfig.quick() if args.quick else RealBenchConfig()
    updates = {
        "train_steps": args.jbu_steps,
        "implicit_steps": args.implicit_steps,
        "seed": args.seed,
        "window": args.window,
        "train_size": args.train_size,
        "methods": tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None,
    }
    cfg = replace(cfg, **{k: v for k, v in updates.items() if v is not None})
    if args.no_mirror:
        cfg = replace(cfg, mirror=False)
    for flag in ("baseline_steps", "n_train", "n_eval", "scene_size"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for the synthetic benchmark, not --real")
    return cfg.validate()


def config_from_args(args: argparse.Namespace):
    from featup.eval.benchmark import BenchConfig
    from featup.eval.images import parse_size

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    updates = {
        "jbu_steps": args.jbu_steps,
        "baseline_steps": args.baseline_steps,
        "implicit_steps": args.implicit_steps,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "seed": args.seed,
        "size": parse_size(args.scene_size) if args.scene_size else None,
        "transfer": False if args.no_transfer else None,  # in the same replace: the size check needs it
    }
    return replace(cfg, **{k: v for k, v in updates.items() if v is not None})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="synthetic benchmark: every upsampler against known ideal features (markdown + JSON)",
        description="Train FeatUp's JBU on synthetic scenes, fit the implicit upsampler per evaluation scene,"
        " "
        "apply every registered upsampler, and score all of them against the extractor's stride-1 features "
        "(cosine, MSE) and through a frozen linear probe (mIoU, accuracy, boundary F). Offline; the default "
        "took 24-43 min on 2 shared CPU cores, almost all of it fitting the implicit upsampler to each of the "
        "12 evaluation scenes (--n-eval 3, as the demo does, takes a few minutes).",
    )
    add_bench_options(p)
    add_real_options(p)
    p.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the results (default featup-bench.json, with --real featup-bench-real.json)",
    )
    p.set_defaults(func=run)


def print_tables(result) -> None:
    from featup.eval.benchmark import format_table

    print("\n## Synthetic benchmark, extractor A (32 channels, stride 14)\n")
    print(format_table(result.rows))
    if result.transfer:
        print("\n## Encoder-agnostic transfer: extractor B (48 channels, stride 16)\n")
        print(format_table(result.transfer))
    cfg = result.config
    print(
        f"\n{cfg['n_train']} training / {cfg['n_eval']} evaluation scenes of "
        f"{cfg['size'][0]}x{cfg['size'][1]} px; "
        f"machine: {result.machine['processor']}, {result.machine['cpu_count']} CPUs, "
        f"torch {result.machine['torch']} ({result.machine['torch_threads']} threads)"
    )


def print_real_table(result) -> None:
    from featup.eval.real_bench import format_real_table

    cfg = result.config
    methods = [r["method"] for r in result.rows]
    trained = ""
    if any(m in methods for m in ("resize_conv", "carafe", "sapa", "jbu_paper", "jbu_trained")):
        trained += (
            f"Trained methods: {cfg['train_steps']} train_jbu steps (batch {cfg['batch_size']}) on "
            f"{len(cfg['train_photos'])} training photos x 5 windows of {cfg['train_size']} px. "
        )
    if "implicit" in methods:
        trained += f"Implicit: {cfg['implicit_steps']} steps ({cfg['implicit_jitters']} jitters) per window and layer. "
    print(
        f"\n## Real photos: EfficientNet-Lite0, {len(result.windows)} windows of {cfg['window']} px "
        f"({', '.join(cfg['eval_photos'])}{', mirrored too' if cfg['mirror'] else ''})\n"
    )
    print(format_real_table(result.rows))
    print(
        f"\nheld-out views: stride-16 features, offsets {cfg['offsets_px']} px; CAM on "
        f"{len(result.cam_windows)} windows with top-1 confidence >= {cfg['confidence']}: "
        f"{'; '.join(result.cam_windows) or 'none'}. {trained}Machine: {result.machine['processor']}, "
        f"{result.machine['cpu_count']} CPUs, torch {result.machine['torch']} "
        f"({result.machine['torch_threads']} threads)"
    )


def _run_real(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from featup.core.checkpoint import atomic_write_bytes
    from featup.eval.images import ensure_writable_dir
    from featup.eval.real_bench import run_real_bench

    cfg = real_config_from_args(args)
    json_path = Path(args.json or "featup-bench-real.json")
    ensure_writable_dir(json_path.parent if str(json_path.parent) else ".")
    result = run_real_bench(cfg, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    print_real_table(result)
    atomic_write_bytes(json_path, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    print(f"\nwrote {json_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from featup.core.checkpoint import atomic_write_bytes
    from featup.eval.benchmark import run_benchmark
    from featup.eval.images import ensure_writable_dir

    if args.real:
        return _run_real(args)
    for flag in ("methods", "window", "train_size"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} needs --real")
    cfg = config_from_args(args)
    json_path = Path(args.json or "featup-bench.json")
    ensure_writable_dir(json_path.parent if str(json_path.parent) else ".")
    result = run_benchmark(cfg, progress=not args.no_progress, log=lambda line: print(line, flush=True))
    print_tables(result)
    atomic_write_bytes(json_path, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    print(f"\nwrote {json_path}")
    return 0
