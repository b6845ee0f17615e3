"""Quality against training steps: bilinear, bicubic, Kopf's JBU, the trained JBU and the implicit upsampler.

Two sets of measures, each reusing the library's own scorers:

- synthetic (``featup.eval.benchmark``): feature cosine and MSE to the known stride-1 features of extractor A
  on the benchmark's evaluation scenes (``_Scorer``, ``synthetic_split``);
- real photos (``featup.eval.real_bench``): held-out views and pooled-back cosine of EfficientNet-Lite0's
  stride-16 features on the evaluation photos (``eval_windows``, ``held_out_cosine``, ``pooled_back_cosine``).

The JBU is one ``train_jbu`` run (default preset; the downsampler kernel is the extractor's stride) scored by
its step callback at every point of the step grid; the implicit upsampler is one ``fit_implicit`` fit per
evaluation image (default preset) scored the same way. Step 0 is the untrained model (the safe start). With
a schedule that depends on the total step count (the implicit default's cosine decay), an intermediate point
is the state of the ``--max-steps`` run at that step, not a run trained for that many steps.

    python tools/bench_curves.py --max-steps 2000 --json tools/results/bench_curves.json \
        --plot docs/images/curves.png
    python tools/bench_curves.py --quick --json /tmp/c.json --plot /tmp/c.png   # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

#: "+bp": followed by featup.core.consistency.back_project (the fresh implicit model is bicubic+bp, the fresh
#: JBU jbu_classic+bp)
FIXED = ("bilinear", "bicubic", "jbu_classic", "bicubic+bp", "jbu_classic+bp")
TRAINED = ("jbu", "implicit")
#: (measure key, label, higher is better)
SYN_MEASURES = (("syn_cosine", "synthetic: cosine to stride-1", True), ("syn_mse", "synthetic: MSE", False))
REAL_MEASURES = (
    ("real_held_out", "real: held-out views (cosine)", True),
    ("real_pooled", "real: pooled-back cosine", True),
)


def step_grid(max_steps: int) -> list[int]:
    """0, 25, 50, 100, 200, 400, ... (doubling) below ``max_steps``, then ``max_steps``."""
    if max_steps < 1:
        raise ValueError(f"expected --max-steps >= 1, got {max_steps}")
    grid, s = [0], 25
    while s < max_steps:
        grid.append(s)
        s = 50 if s == 25 else 2 * s
    return grid + [max_steps]


class _Recorder:
    """Patches ``fit_implicit``'s ImplicitUpsampler class to keep the instance it builds (to score it mid-fit)."""

    def __init__(self, on_ready: Callable[[nn.Module], None]):
        from featup.core import implicit_fit

        self.module = implicit_fit
        self.instance: nn.Module | None = None
        base = implicit_fit.ImplicitUpsampler
        rec = self

        class Recording(base):  # type: ignore[misc, valid-type]
            def set_base(self, lr_compressed: torch.Tensor) -> None:
                super().set_base(lr_compressed)
                if not self.consistency:
                    self._ready()

            def set_lr(self, lr_feats: torch.Tensor) -> None:
                super().set_lr(lr_feats)
                self._ready()

            def _ready(self) -> None:
                rec.instance = self
                on_ready(self)  # the last set-up call before the first step: the step-0 model

        self.cls = Recording

    def __enter__(self) -> _Recorder:
        self._patch = mock.patch.object(self.module, "ImplicitUpsampler", self.cls)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.__exit__(*exc)


def _eval_mode(module: nn.Module, fn: Callable[[], Any]) -> Any:
    was = module.training
    module.eval()
    try:
        with torch.inference_mode():
            return fn()
    finally:
        module.train(was)


def _fit_implicit_curve(
    backbone: nn.Module, image: torch.Tensor, grid: Sequence[int], seed: int, render: Callable, **kw: Any
) -> dict[int, torch.Tensor]:
    """Renders of one ``fit_implicit`` fit at every step of ``grid`` (step 0: the untrained model)."""
    from featup.core.training import fit_implicit

    outs: dict[int, torch.Tensor] = {}
    want = set(grid)
    holder: dict[str, nn.Module] = {}

    def ready(imp: nn.Module) -> None:
        holder["imp"] = imp
        if 0 in want:
            outs[0] = _eval_mode(imp, lambda: render(imp))

    def callback(step: int, _logs: dict[str, float]) -> None:
        if step in want:
            outs[step] = _eval_mode(holder["imp"], lambda: render(holder["imp"]))

    with _Recorder(ready):
        fit_implicit(backbone, image, steps=max(grid), seed=seed, progress=False, callback=callback, **kw)
    if set(outs) != want:
        raise RuntimeError(f"expected renders at steps {sorted(want)}, got {sorted(outs)}")
    return outs


def _train_jbu_curve(
    backbone: nn.Module, images: torch.Tensor, grid: Sequence[int], seed: int, apply: Callable, **kw: Any
) -> tuple[dict[int, torch.Tensor], float]:
    """Outputs of one ``train_jbu`` run (default preset) at every step of ``grid``; and seconds per step."""
    from featup.core import JBUStack
    from featup.core.training import train_jbu

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        up = JBUStack()  # train_jbu's own default stack, built here so step 0 can be scored
    outs = {0: _eval_mode(up, lambda: apply(up))} if 0 in grid else {}
    want = set(grid)

    def callback(step: int, _logs: dict[str, float]) -> None:
        if step in want:
            outs[step] = _eval_mode(up, lambda: apply(up))

    t0 = time.perf_counter()
    train_jbu(
        backbone, images, steps=max(grid), upsampler=up, seed=seed, progress=False, callback=callback, **kw
    )
    per_step = (time.perf_counter() - t0) / max(grid)
    return outs, per_step


class _BackProjected(nn.Module):
    """``up`` followed by the back-projection onto the input features."""

    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        self.up = up

    def forward(self, lr: torch.Tensor, image: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        from featup.core.consistency import back_project

        return back_project(self.up(lr, image, output_size), lr)


def _fixed(name: str) -> nn.Module:
    from featup.core import create_upsampler

    if name.endswith("+bp"):
        return _BackProjected(create_upsampler(name[: -len("+bp")]))
    return create_upsampler(name)


# --------------------------------------------------------------------------------------------------- synthetic
def run_synthetic(
    args: argparse.Namespace, grid: Sequence[int], log: Callable[[str], None]
) -> dict[str, Any]:
    from featup.eval.benchmark import BenchConfig, _apply, _Scorer
    from featup.eval.synthetic import SyntheticExtractor, synthetic_split

    size = (args.syn_size, args.syn_size)
    cfg = BenchConfig(size=size, n_train=args.syn_train, n_eval=args.syn_eval, transfer=False, seed=args.seed)
    train = synthetic_split("train", cfg.n_train, cfg.size, seed=cfg.seed)
    evals = synthetic_split("eval", cfg.n_eval, cfg.size, seed=cfg.seed)
    ext = SyntheticExtractor("a")
    scorer = _Scorer(ext, train, evals, cfg)

    def scores(hr: torch.Tensor) -> dict[str, float]:
        s = scorer.score(hr.float())
        return {"syn_cosine": s["cosine"], "syn_mse": s["mse"]}

    fixed = {}
    for name in FIXED:
        fixed[name] = scores(_apply(_fixed(name), scorer.lr, evals.images))
        log(f"[synthetic] {name}: {fixed[name]}")

    def apply(up: nn.Module) -> torch.Tensor:
        return torch.cat([up(f[None], x[None]) for f, x in zip(scorer.lr, evals.images)])

    curves, per_step = {}, {}
    if "jbu" in args.trained:
        jbu_outs, per_step["jbu"] = _train_jbu_curve(
            ext, train.images, grid, args.seed, apply, kernel_size=ext.stride, **_jbu_kw(args)
        )
        curves["jbu"] = {s: scores(o) for s, o in sorted(jbu_outs.items())}
        log(f"[synthetic] jbu ({per_step['jbu']:.2f} s/step): {curves['jbu']}")
    if "implicit" in args.trained:
        curves["implicit"], per_step["implicit"] = _implicit_curve(
            ext, evals.images, grid, args, scores, lambda imp: imp.render(size)
        )
        log(f"[synthetic] implicit ({per_step['implicit']:.2f} s/step/image): {curves['implicit']}")
    return {
        "setup": {
            "size": list(size),
            "n_train": cfg.n_train,
            "n_eval": cfg.n_eval,
            "extractor": "a",
            "stride": ext.stride,
            "feat_dim": ext.feat_dim,
        },
        "fixed": fixed,
        "curves": curves,
        "seconds_per_step": per_step,
    }


def _implicit_curve(
    backbone: nn.Module,
    images: torch.Tensor,
    grid: Sequence[int],
    args: argparse.Namespace,
    scores: Callable[[torch.Tensor], dict[str, float]],
    render: Callable[[nn.Module], torch.Tensor],
) -> tuple[dict[int, dict[str, float]], float]:
    """One ``fit_implicit`` fit per image scored at every grid step; and seconds per step and image."""
    per_image = []
    t0 = time.perf_counter()
    for i in range(len(images)):
        per_image.append(
            _fit_implicit_curve(backbone, images[i : i + 1], grid, args.seed + i, render, **_imp_kw(args))
        )
    per_step = (time.perf_counter() - t0) / (len(images) * max(grid))
    return {s: scores(torch.cat([p[s] for p in per_image])) for s in grid}, per_step


# ------------------------------------------------------------------------------------------------------- real
def run_real(args: argparse.Namespace, grid: Sequence[int], log: Callable[[str], None]) -> dict[str, Any]:
    from featup.backbones import create_backbone
    from featup.eval.photos import EVAL_PHOTOS, TRAIN_PHOTOS
    from featup.eval.real_bench import eval_windows, held_out_cosine, pooled_back_cosine, training_windows

    bb = create_backbone("efficientnet_lite0", pretrained=True, layer=16)
    stride, win = int(bb.stride), args.real_window
    names = tuple(args.real_photos or EVAL_PHOTOS)
    labels, crops = eval_windows(names, win, stride, mirror=args.real_mirror)
    images = crops[..., :win, :win].contiguous()
    offsets = [(stride // 2, 0), (0, stride // 2), (stride // 2, stride // 2), (stride // 4, stride // 4)]
    with torch.inference_mode():
        lr = bb(images)
        shifted = {o: bb(crops[..., o[0] : o[0] + win, o[1] : o[1] + win].contiguous()) for o in offsets}

    def scores(hr: torch.Tensor) -> dict[str, float]:
        hr = hr.float()
        held = [held_out_cosine(hr, shifted[o], o, stride) for o in offsets]
        return {"real_held_out": sum(held) / len(held), "real_pooled": pooled_back_cosine(hr, lr)}

    def apply(up: nn.Module) -> torch.Tensor:
        return torch.cat([up(lr[i : i + 1], images[i : i + 1]) for i in range(len(labels))])

    fixed = {}
    for name in FIXED:
        up = _fixed(name)
        with torch.inference_mode():
            fixed[name] = scores(apply(up))
        log(f"[real] {name}: {fixed[name]}")

    train = training_windows(tuple(args.real_train_photos or TRAIN_PHOTOS), args.real_train_size)
    curves, per_step = {}, {}
    if "jbu" in args.trained:
        jbu_outs, per_step["jbu"] = _train_jbu_curve(
            bb, train, grid, args.seed, apply, kernel_size=stride, **_jbu_kw(args)
        )
        curves["jbu"] = {s: scores(o) for s, o in sorted(jbu_outs.items())}
        log(f"[real] jbu ({per_step['jbu']:.2f} s/step): {curves['jbu']}")
    if "implicit" in args.trained:
        curves["implicit"], per_step["implicit"] = _implicit_curve(
            bb, images, grid, args, scores, lambda imp: imp.render((win, win))
        )
        log(f"[real] implicit ({per_step['implicit']:.2f} s/step/image): {curves['implicit']}")
    return {
        "setup": {
            "backbone": "efficientnet_lite0 (stride 16)",
            "windows": labels,
            "window": win,
            "offsets_px": [list(o) for o in offsets],
            "train_photos": list(args.real_train_photos or TRAIN_PHOTOS),
            "train_size": args.real_train_size,
            "train_windows": int(train.shape[0]),
        },
        "fixed": fixed,
        "curves": curves,
        "seconds_per_step": per_step,
    }


def _imp_kw(args: argparse.Namespace) -> dict[str, Any]:
    """``fit_implicit`` overrides: none but ``--implicit-pca-dim``, except under ``--quick`` (smaller views)."""
    kw: dict[str, Any] = {"pca_dim": args.implicit_pca_dim} if args.implicit_pca_dim else {}
    return {**kw, "n_jitters": 2, "bank_size": 4} if args.quick else kw


def _jbu_kw(args: argparse.Namespace) -> dict[str, Any]:
    """``train_jbu`` overrides beyond the kernel size: ``--jbu-overrides``, and under ``--quick`` one small
    batch."""
    return {**args.jbu_overrides, **({"batch_size": 1, "n_jitters": 1} if args.quick else {})}


# ---------------------------------------------------------------------------------------------------- output
def _measures(result: dict[str, Any]) -> list[tuple[str, str, bool, dict[str, Any]]]:
    out = []
    for part, measures in (("synthetic", SYN_MEASURES), ("real", REAL_MEASURES)):
        if part in result:
            out += [(k, label, hi, result[part]) for k, label, hi in measures]
    return out


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per (method, step), one column per measure; fixed methods once, at step '-'."""
    ms = _measures(result)
    header = ["method", "steps"] + [f"{label} {'↑' if hi else '↓'}" for _, label, hi, _ in ms]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(ms)]

    def fmt(key: str, v: float) -> str:
        return f"{v:.4f}"  # the safe starts sit within 1e-3 of bicubic: three digits would hide it

    for name in FIXED:
        cells = [fmt(k, part["fixed"][name][k]) if name in part["fixed"] else "" for k, _, _, part in ms]
        lines.append(f"| {name} | - | " + " | ".join(cells) + " |")
    steps = sorted({s for _, _, _, part in ms for c in part["curves"].values() for s in c})
    for method in (m for m in TRAINED if any(m in part["curves"] for _, _, _, part in ms)):
        for step in steps:
            cells = [
                fmt(k, part["curves"][method][step][k]) if step in part["curves"].get(method, {}) else ""
                for k, _, _, part in ms
            ]
            lines.append(f"| {method} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per measure: log-x curves of the JBU and the implicit upsampler, fixed methods as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = _measures(result)
    fig, axes = plt.subplots(1, len(ms), figsize=(3.4 * len(ms), 3.0), squeeze=False)
    colors = {
        "bilinear": "tab:gray",
        "bicubic": "black",
        "jbu_classic": "tab:green",
        "bicubic+bp": "tab:purple",
        "jbu_classic+bp": "tab:olive",
    }
    for ax, (key, label, hi, part) in zip(axes[0], ms):
        grid = sorted({s for c in part["curves"].values() for s in c})
        # log x cannot show 0: step 0 is drawn at half the first positive step, labelled "0"
        x0 = (grid[1] if len(grid) > 1 else 1) / 2
        xs = [x0 if s == 0 else s for s in grid]
        for name in (n for n in FIXED if n in part["fixed"]):
            ax.axhline(part["fixed"][name][key], color=colors[name], ls="--", lw=1, label=name)
        for method, c in (
            (m, c) for m, c in (("jbu", "tab:blue"), ("implicit", "tab:red")) if m in part["curves"]
        ):
            ax.plot(xs, [part["curves"][method][s][key] for s in grid], "o-", color=c, ms=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(s) for s in grid], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("training steps")
        ax.set_title(f"{label} {'↑' if hi else '↓'}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    def conv(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    return conv(result)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps (seconds; for tests)")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--parts", default="synthetic,real", help="comma-separated: synthetic, real")
    p.add_argument("--syn-size", type=int, default=224)
    p.add_argument("--syn-train", type=int, default=16)
    p.add_argument("--syn-eval", type=int, default=4)
    p.add_argument("--real-window", type=int, default=224)
    p.add_argument("--real-photos", nargs="*", default=None, help="default: featup.eval.photos.EVAL_PHOTOS")
    p.add_argument("--real-mirror", action="store_true", help="also evaluate each photo's mirror image")
    p.add_argument("--real-train-photos", nargs="*", default=None)
    p.add_argument("--real-train-size", type=int, default=224)
    p.add_argument("--implicit-pca-dim", type=int, default=None, help="default: fit_implicit's preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained", default="jbu,implicit", help="comma-separated trained methods: jbu, implicit")
    p.add_argument(
        "--jbu-overrides",
        default="{}",
        help="train_jbu settings on top of the default preset, as JSON (e.g. '{\"lr\": 0.01}')",
    )
    p.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="merge saved results (e.g. a synthetic and a real run with the same grid) instead of running",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps = min(args.max_steps, 2)
        args.syn_size, args.syn_train, args.syn_eval = 112, 2, 1
        args.real_window, args.real_train_size = 64, 64
        args.real_photos = args.real_photos or ["chelsea"]
        args.real_train_photos = args.real_train_photos or ["rocket"]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("synthetic", "real")]
    if not parts or bad:
        p.error(f"expected --parts from synthetic, real; got {args.parts!r}")
    args.parts = parts
    trained = [s.strip() for s in args.trained.split(",") if s.strip()]
    if not trained or any(t not in TRAINED for t in trained):
        p.error(f"expected --trained from {', '.join(TRAINED)}; got {args.trained!r}")
    args.trained = trained
    try:
        args.jbu_overrides = json.loads(args.jbu_overrides)
    except json.JSONDecodeError as e:
        p.error(f"expected --jbu-overrides as a JSON object, got {args.jbu_overrides!r} ({e})")
    if not isinstance(args.jbu_overrides, dict):
        p.error(f"expected --jbu-overrides as a JSON object, got {args.jbu_overrides!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        result = merge([json.loads(Path(f).read_text()) for f in args.from_json])
        return _write(result, args)
    grid = step_grid(args.max_steps)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result: dict[str, Any] = {"grid": grid, "seed": args.seed, "quick": args.quick}
    if "synthetic" in args.parts:
        result["synthetic"] = run_synthetic(args, grid, log)
    if "real" in args.parts:
        result["real"] = run_real(args, grid, log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python tools/bench_curves.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["torch_threads"] = torch.get_num_threads()
    return _write(result, args)


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from saved ones (JSON keys back to ints), parts taken in order; each part keeps its grid.

    Raises:
        ValueError: a part present twice.
    """
    out: dict[str, Any] = {"grid": sorted({s for r in results for s in r["grid"]}), "runs": []}
    for r in results:
        out["runs"].append({k: r.get(k) for k in ("command", "seconds", "seed", "torch_threads")})
        for part in ("synthetic", "real"):
            if part in r:
                if part in out:
                    raise ValueError(f"expected each part once, got {part!r} twice")
                curves = {m: {int(s): v for s, v in c.items()} for m, c in r[part]["curves"].items()}
                out[part] = {**r[part], "curves": curves}
    return out


def _write(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_ready(result), indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
