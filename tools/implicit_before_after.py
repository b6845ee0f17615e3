"""Quality of fit_implicit before (main 1526939) and after (h/implfast): synthetic scorer and real photos.

The harness of docs/decisions.md#implicit-grid (run from the repository root)::

    mkdir -p /tmp/before && git archive 1526939 packages | tar -x -C /tmp/before
    python tools/implicit_before_after.py --code before|after --bench syn|real --setting default|attention

Prints one JSON line per seed.
"""

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", required=True, choices=["before", "after"])
    ap.add_argument("--bench", required=True, choices=["syn", "real"])
    ap.add_argument("--setting", default="default", choices=["default", "attention"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--before-root", default="/tmp/before/packages")
    args = ap.parse_args()
    if args.code == "before":
        root = args.before_root
        sys.path[:0] = [f"{root}/featup-core/src", f"{root}/featup-backbones/src", f"{root}/featup-eval/src"]
    import torch

    import featup.core

    if (args.code == "before") != featup.core.__file__.startswith(args.before_root):
        raise SystemExit(f"wrong featup.core for --code {args.code}: {featup.core.__file__}")
    torch.set_num_threads(1)
    (syn if args.bench == "syn" else real)(args)


def syn(args: argparse.Namespace) -> None:
    import torch

    from featup.core import fit_implicit
    from featup.eval.benchmark import BenchConfig, _Scorer
    from featup.eval.synthetic import SyntheticExtractor, synthetic_split

    cfg = BenchConfig(n_eval=4, implicit_steps=args.steps or 100, transfer=False)
    train = synthetic_split("train", cfg.n_train, cfg.size, seed=0)
    evals = synthetic_split("eval", cfg.n_eval, cfg.size, seed=0)
    ext = SyntheticExtractor("a")
    scorer = _Scorer(ext, train, evals, cfg)
    for seed in args.seeds:
        t0, outs = time.perf_counter(), []
        for i in range(len(evals)):
            # spelled out, not a BenchConfig helper: --code before imports an older featup.eval
            kw = dict(
                steps=cfg.implicit_steps,
                n_jitters=cfg.implicit_jitters,
                lr=cfg.implicit_lr,
                pca_dim=cfg.implicit_pca_dim,
                max_pad=cfg.max_pad,
                max_zoom=cfg.implicit_max_zoom,
                p_zoom=cfg.p_zoom,
                p_flip=cfg.p_flip,
                downsampler=cfg.implicit_downsampler,
                kernel_size=ext.stride,
                seed=seed * 100 + i,
                progress=False,
            )
            if args.setting == "attention":
                kw.update(downsampler="attention", n_jitters=4)
            imp = fit_implicit(ext, evals.images[i : i + 1], **kw)
            with torch.inference_mode():
                outs.append(imp.render(tuple(cfg.size)))
        scores = scorer.score(torch.cat(outs))
        row = {"code": args.code, "bench": "syn", "setting": args.setting, "seed": seed}
        row.update({k: round(float(v), 5) for k, v in scores.items()})
        print(json.dumps({**row, "s": round(time.perf_counter() - t0, 1)}), flush=True)


def real(args: argparse.Namespace) -> None:
    import torch

    from featup.backbones import create_backbone
    from featup.core import fit_implicit
    from featup.eval.real_bench import eval_windows, held_out_cosine, pooled_back_cosine

    bb = create_backbone("efficientnet_lite0", pretrained=True, layer=16)
    s, win = bb.stride, 224
    labels, crops = eval_windows(("chelsea", "coffee"), win, s, False)
    images = crops[..., :win, :win].contiguous()
    offsets = [(0, 8), (8, 0), (8, 8), (4, 4)]
    with torch.inference_mode():
        lr = bb(images)
        shifted = {o: bb(crops[..., o[0] : o[0] + win, o[1] : o[1] + win].contiguous()) for o in offsets}
    for seed in args.seeds:
        t0, outs = time.perf_counter(), []
        for i in range(len(labels)):
            kw = dict(steps=args.steps or 50, seed=seed, progress=False)
            if args.setting == "attention":
                kw.update(downsampler="attention", n_jitters=4)
            imp = fit_implicit(bb, images[i : i + 1], **kw)
            with torch.inference_mode():
                outs.append(imp(lr[i : i + 1], images[i : i + 1]).float())
        hr = torch.cat(outs)
        with torch.inference_mode():
            held = [held_out_cosine(hr, shifted[o], o, s) for o in offsets]
        row = {"code": args.code, "bench": "real", "setting": args.setting, "seed": seed}
        row.update(
            held_out_cos=round(sum(held) / len(held), 5), pooled_cos=round(pooled_back_cosine(hr, lr), 5)
        )
        print(json.dumps({**row, "s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
