"""Time and quality of ``train_jbu`` / ``fit_implicit`` with ``precision=`` float32, bfloat16 and float16.

    /work/venv/bin/python tools/bench_training_precision.py      # writes tools/results/bench_training_precision.json
    /work/venv/bin/python tools/bench_training_precision.py --jbu-steps 10 --json /tmp/p.json

Setup: the synthetic benchmark's extractor A (Gabor energies, 32 channels, stride 14; a conv-heavy backbone)
on synthetic scenes at ``--size`` px, with the benchmark's jitter settings (no flips, zoom <= 1.2). For each
precision, in one process and one thread (``--threads``): the backbone's forward time on a batch under
autocast; ``train_jbu`` for ``--jbu-steps`` steps (batch 4, 2 jitters) and ``fit_implicit`` for
``--implicit-steps`` steps (8 jitters) on the same seed, timed per step (the first step, with one-off costs,
is excluded); the mean loss of the last five steps; and the trained JBU's feature MSE against the extractor's
stride-1 ground truth on held-out scenes (bilinear given for scale). Ratios are against float32 in the same
run. Speed depends on whether the CPU has native bfloat16/float16 arithmetic; the table says which CPU ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PRECISIONS = ("float32", "bfloat16", "float16")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _recorder(times: list[float], losses: list[float]):
    """A training callback recording each completed step's wall time and loss."""
    last = [time.perf_counter()]

    def callback(step: int, logs: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        losses.append(logs["loss"])
        last[0] = now

    return callback


def measure(precision: str, args: argparse.Namespace) -> dict:
    from featup.core.precision import mixed_precision
    from featup.core.training import fit_implicit, train_jbu
    from featup.eval.synthetic import SyntheticExtractor, synthetic_split

    torch.manual_seed(0)
    backbone = SyntheticExtractor("a")
    size = (args.size, args.size)
    train = synthetic_split("train", args.train_images, size=size).images
    held_out = synthetic_split("eval", args.eval_images, size=size).images
    jitter = dict(p_flip=0.0, max_zoom=1.2)

    with torch.no_grad(), mixed_precision(precision, "cpu"):
        backbone(train[:4])
        start = time.perf_counter()
        for _ in range(3):
            backbone(train[:4])
        backbone_ms = (time.perf_counter() - start) / 3 * 1e3

    jbu_times: list[float] = []
    jbu_losses: list[float] = []
    up = train_jbu(
        backbone,
        train,
        steps=args.jbu_steps,
        batch_size=4,
        n_jitters=2,
        kernel_size=14,
        progress=False,
        precision=precision,
        callback=_recorder(jbu_times, jbu_losses),
        **jitter,
    )
    with torch.no_grad():
        lr_feats, truth = backbone(held_out), backbone.dense(held_out)
        jbu_mse = float((up(lr_feats, held_out) - truth).square().mean())
        bilinear = F.interpolate(lr_feats, size=size, mode="bilinear", align_corners=False)
        bilinear_mse = float((bilinear - truth).square().mean())

    imp_times: list[float] = []
    imp_losses: list[float] = []
    fit_implicit(
        backbone,
        held_out[:1],
        steps=args.implicit_steps,
        n_jitters=8,
        kernel_size=14,
        pca_dim=32,
        progress=False,
        precision=precision,
        callback=_recorder(imp_times, imp_losses),
        upsampler_kwargs={"hidden_dim": 64},
        **jitter,
    )

    def per_step(times: list[float]) -> float:
        rest = times[1:] or times
        return sum(rest) / len(rest)

    return {
        "precision": precision,
        "backbone_ms": backbone_ms,
        "jbu_s_per_step": per_step(jbu_times),
        "jbu_final_loss": sum(jbu_losses[-5:]) / len(jbu_losses[-5:]),
        "jbu_heldout_mse": jbu_mse,
        "bilinear_heldout_mse": bilinear_mse,
        "implicit_s_per_step": per_step(imp_times),
        "implicit_final_loss": sum(imp_losses[-5:]) / len(imp_losses[-5:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=84, help="scene size in px (default 84, the benchmark's)")
    p.add_argument("--train-images", type=int, default=16)
    p.add_argument("--eval-images", type=int, default=3)
    p.add_argument("--jbu-steps", type=int, default=30)
    p.add_argument("--implicit-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_training_precision.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = [measure(prec, args) for prec in PRECISIONS]
    base = rows[0]
    print(
        f"Training precision on {_cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.size} px, JBU {args.jbu_steps} steps, implicit {args.implicit_steps} steps\n"
    )
    print(
        "| precision | backbone fwd ms (x fp32) | train_jbu s/step (x fp32) | JBU final loss | "
        "JBU held-out MSE (bilinear) | fit_implicit s/step (x fp32) | implicit final loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['precision']} | {r['backbone_ms']:.1f} ({r['backbone_ms'] / base['backbone_ms']:.2f}x) "
            f"| {r['jbu_s_per_step']:.3f} ({r['jbu_s_per_step'] / base['jbu_s_per_step']:.2f}x) "
            f"| {r['jbu_final_loss']:.4f} | {r['jbu_heldout_mse']:.4f} ({r['bilinear_heldout_mse']:.4f}) "
            f"| {r['implicit_s_per_step']:.3f} ({r['implicit_s_per_step'] / base['implicit_s_per_step']:.2f}x) "
            f"| {r['implicit_final_loss']:.4f} |"
        )
    meta = {
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        **{k: v for k, v in vars(args).items() if k != "json"},
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
