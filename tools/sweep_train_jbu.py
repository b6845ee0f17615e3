"""Small quality sweeps of ``train_jbu`` settings on the synthetic world (docs/decisions.md#train-jbu).

    python tools/sweep_train_jbu.py --name floor --runs '[{"lr": 0.02, "uncertainty": true}]' --seeds 0 1 2

Extractor A (Gabor energies, 32 channels, stride 14) on ``--size`` px synthetic scenes (``--train`` training
scenes, ``--eval`` held-out ones), the benchmark's jitters (no flips, zoom <= 1.2), kernel size 14; each run
trains ``--steps`` steps with the given overrides and reports the held-out MSE and cosine similarity of the
upsampled features to the extractor's stride-1 features, with bicubic on the same scenes for scale. The lowest
log-scale eq. 1 saw is recorded (log(1e-4) = -9.21 is where the floor binds). One JSON line per (run, seed) is appended to ``--out``. Set ``"min_scale": null`` to train without eq. 1's
scale floor (patched into the loss for that run), ``"salience_dropout": p`` to set the attention
downsampler's dropout.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F


def measure(overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    import featup.core.training as training
    from featup.eval.synthetic import SyntheticExtractor, synthetic_split

    overrides = dict(overrides)
    min_scale = overrides.pop("min_scale", "default")
    salience_dropout = overrides.pop("salience_dropout", None)
    real_create = training.create_downsampler

    def create(kind, dim, kernel_size, **kw):
        down = real_create(kind, dim, kernel_size, **kw)
        if salience_dropout is not None and hasattr(down, "salience_net"):
            down.dropout = down.salience_net[0].p = float(salience_dropout)
        return down

    training.create_downsampler = create
    real_loss = training.reconstruction_loss
    loss_fn = functools.partial(real_loss, min_scale=min_scale) if min_scale != "default" else real_loss
    lowest = [float("inf")]

    def recording_loss(pred, target, log_scale=None, **kw):
        if log_scale is not None:
            lowest[0] = min(lowest[0], float(log_scale.detach().min()))
        return loss_fn(pred, target, log_scale, **kw)

    training.reconstruction_loss = recording_loss
    backbone = SyntheticExtractor("a")
    size = (args.size, args.size)
    train = synthetic_split("train", args.train, size=size).images
    held = synthetic_split("eval", args.eval, size=size).images
    kwargs = dict(
        batch_size=2, n_jitters=2, kernel_size=14, p_flip=0.0, max_zoom=1.2, lr=1e-2, progress=False
    )
    kwargs.update(overrides)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        up = training.train_jbu(
            backbone,
            train,
            steps=args.steps,
            seed=seed,
            callback=lambda s, l: losses.append(l["loss"]),
            **kwargs,
        )
    finally:
        training.reconstruction_loss = real_loss
        training.create_downsampler = real_create
    seconds = time.perf_counter() - start
    with torch.no_grad():
        lr_feats, truth = backbone(held), backbone.dense(held)
        pred = up(lr_feats, held)
        bicubic = F.interpolate(lr_feats, size=size, mode="bicubic", align_corners=False)

    def scores(x: torch.Tensor) -> tuple[float, float]:
        return float((x - truth).square().mean()), float(F.cosine_similarity(x, truth, dim=1).mean())

    mse, cos = scores(pred)
    bmse, bcos = scores(bicubic)
    extra = {"min_scale": min_scale} if min_scale != "default" else {}
    if salience_dropout is not None:
        extra["salience_dropout"] = salience_dropout
    return {
        "overrides": {**overrides, **extra},
        "seed": seed,
        "steps": args.steps,
        "mse": mse,
        "cos": cos,
        "bicubic_mse": bmse,
        "bicubic_cos": bcos,
        "final_loss": sum(losses[-5:]) / 5,
        "min_log_scale": lowest[0],
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--runs", required=True, help="JSON list of train_jbu overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--train", type=int, default=16)
    p.add_argument("--eval", type=int, default=6)
    p.add_argument("--out", default="/tmp/trainjbu_sweep.jsonl")
    args = p.parse_args()
    torch.set_num_threads(1)
    for overrides in json.loads(args.runs):
        for seed in args.seeds:
            row = {"name": args.name, **measure(overrides, seed, args)}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
