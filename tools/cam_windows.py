"""CAM faithfulness of fixed and shipped upsamplers on many windows of real photos, with paired statistics.

    python tools/cam_windows.py --json tools/results/cam_windows.json
    python tools/cam_windows.py --blend 0,0.25,0.5,0.75,1 --held-out --json tools/results/cam_tradeoff.json
    python tools/cam_windows.py --photos train --blend 0,0.25,0.5,0.75,1 --held-out

`featup bench --real` scores CAM on the 8 evaluation windows, of which 6 are confident: one window moves the
mean by several points. This script takes 5 scales (shorter side 224 / 256 / 288 / 320 / 352 px) x up to
3 x 3 positions (224 px windows at the top / centre / bottom and left / centre / right) x mirror of each photo
of the evaluation (or training) split, keeps the windows where EfficientNet-Lite0's top-1 confidence is >=
``--confidence``, and reports per method Average Drop / Increase (the bench's ``cam_faithfulness``) of the
1280-channel head's CAM, and the per-window Average Drop minus bilinear's: mean ± standard error over the
windows, and the mean per photo (the windows of one photo overlap, so the standard error is optimistic: the
per-photo column says whether every photo agrees).

Every method here is linear in the features for a fixed image (its kernels come from the image alone), so the
CAM of the upsampled 1280-channel map equals the upsampled 1-channel low-res CAM; the script upsamples the
CAM and checks that identity on the first window of every method against the full 1280-channel path.

``--blend A,B,..`` adds, for each method that ends with the back-projection (``bicubic_bp``,
``jbu_classic_bp``, ``jbu_shipped``), the rows ``pre + a (bp(pre) - pre)``: ``pre`` is the method without its
back-projection, ``a = 1`` the method itself, ``a = 0`` no back-projection. ``--held-out`` adds the bench's
held-out views measure (stride-16 features, ``featup bench --real``'s windows and offsets) to every row.
Methods need no per-window fitting (the implicit upsampler is not included). Numbers: docs/decisions.md#cam-215.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

METHODS = ("nearest", "bilinear", "bicubic", "jbu_classic", "bicubic_bp", "jbu_classic_bp", "jbu_shipped")
#: methods that end with the back-projection, and the method they are without it
BACK_PROJECTED = {"bicubic_bp": "bicubic", "jbu_classic_bp": "jbu_classic", "jbu_shipped": None}
SCALES = (224, 256, 288, 320, 352)
SIZE = 224


def windows(
    names: Sequence[str], scales: Sequence[int] = SCALES, size: int = SIZE
) -> tuple[list[str], torch.Tensor]:
    """Square windows of each photo: per scale (shorter side), the distinct top / centre / bottom x left /
    centre / right positions, each followed by its mirror image. Labels ``"name@side/top,left[ mirror]"``."""
    from featup.eval.photos import load_photo

    labels, out = [], []
    for name in names:
        for side in scales:
            img = load_photo(name, side)
            h, w = img.shape[-2:]
            for top in sorted({0, (h - size) // 2, h - size}):
                for left in sorted({0, (w - size) // 2, w - size}):
                    crop = img[..., top : top + size, left : left + size]
                    for mirror in (False, True):
                        out.append(crop.flip(-1) if mirror else crop)
                        labels.append(f"{name}@{side}/{top},{left}{' mirror' if mirror else ''}")
    return labels, torch.cat(out)


def upsampler(name: str, back_projection: bool = True, checkpoint: Path | None = None) -> nn.Module:
    """The method ``name`` in eval mode (a saved ``JBUStack`` if ``checkpoint`` is given); with
    ``back_projection=False`` the same method without its final back-projection step."""
    from featup.core import JBUStack, create_upsampler
    from featup.eval.pretrained import load_shipped_jbu

    if checkpoint is not None or name == "jbu_shipped":
        up = load_shipped_jbu() if checkpoint is None else JBUStack.load(checkpoint)
        up.consistency = up.consistency and back_projection
        return up.eval()
    if not back_projection and name in BACK_PROJECTED:
        return create_upsampler(BACK_PROJECTED[name]).eval()
    return create_upsampler(name).eval()


def blended(pre: nn.Module, alpha: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``x, image -> pre(x, image) + alpha * (back_project(pre(x, image), x) - pre(x, image))``."""
    from featup.core.consistency import back_project

    def run(x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        out = pre(x, image)
        return torch.lerp(out, back_project(out, x), alpha)

    return run


def per_window(images: torch.Tensor, cams: torch.Tensor, classes: torch.Tensor, probs) -> torch.Tensor:
    """Per-window Average Drop terms ``max(0, Y - O) / Y * 100`` (their mean is ``average_drop``)."""
    from featup.eval.cam import average_drop, cam_masked_image

    idx = torch.arange(len(images))
    y = probs(images)[idx, classes]
    o = probs(cam_masked_image(images, cams))[idx, classes]
    return torch.tensor([average_drop(y[i : i + 1], o[i : i + 1]) for i in range(len(images))])


def paired(drop: torch.Tensor, ref: torch.Tensor, photo_of: Sequence[str]) -> dict:
    """Mean ± standard error of ``drop - ref`` over windows, and its mean per photo."""
    d = (drop - ref).double()
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
    photos = dict.fromkeys(photo_of)
    by_photo = {p: float(d[[i for i, q in enumerate(photo_of) if q == p]].mean()) for p in photos}
    return {
        "drop_vs_bilinear": float(d.mean()),
        "drop_vs_bilinear_se": se,
        "drop_vs_bilinear_by_photo": by_photo,
    }


class HeldOut:
    """``featup bench --real``'s held-out views measure on the photos' bench windows (stride-16 features)."""

    def __init__(self, names: Sequence[str]) -> None:
        from featup.backbones import create_backbone
        from featup.eval.real_bench import RealBenchConfig, eval_windows

        cfg = RealBenchConfig()
        self.bb = create_backbone("efficientnet_lite0", pretrained=True, layer=16)
        s = self.bb.stride
        _, crops = eval_windows(names, cfg.window, 32, cfg.mirror)
        self.images = crops[..., : cfg.window, : cfg.window].contiguous()
        self.offsets = sorted({(round(fy * s), round(fx * s)) for fy, fx in cfg.offsets} - {(0, 0)})
        with torch.inference_mode():
            self.lr = self.bb(self.images)
            w = cfg.window
            self.shifted = {
                o: self.bb(crops[..., o[0] : o[0] + w, o[1] : o[1] + w].contiguous()) for o in self.offsets
            }

    def __call__(self, up: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        from featup.eval.real_bench import held_out_cosine

        with torch.inference_mode():
            hr = torch.cat([up(self.lr[i : i + 1], self.images[i : i + 1]) for i in range(len(self.images))])
            return statistics.mean(
                held_out_cosine(hr, self.shifted[o], o, self.bb.stride) for o in self.offsets
            )


def check_linear(
    up, bb, lr: torch.Tensor, cam_lr: torch.Tensor, image: torch.Tensor, cls: torch.Tensor
) -> float:
    """Relative difference between the CAM of the upsampled features and the upsampled CAM (one window)."""
    with torch.inference_mode():
        full = bb.class_activation_map(up(lr, image).float(), cls)
        fast = up(cam_lr, image)[:, 0].float()
    return float((full - fast).abs().max() / full.abs().max().clamp_min(1e-12))


def parse_floats(text: str, what: str, p: argparse.ArgumentParser) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"expected {what} as comma-separated numbers, got {text!r}")
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        p.error(f"expected {what} in [0, 1], got {text!r}")
    return values


def parse_checkpoints(items: Sequence[str], p: argparse.ArgumentParser) -> dict[str, Path]:
    """``["label=path", ...]`` -> ``{label: path}``; each path must name an existing checkpoint."""
    out: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            p.error(f"expected --checkpoint as LABEL=PATH, got {item!r}")
        if label in METHODS or label in out:
            p.error(f"expected a new label for --checkpoint, got {label!r} twice or a method's name")
        weights = Path(path).with_suffix(".safetensors")
        if not weights.is_file():
            p.error(f"expected --checkpoint {label}'s weights at {weights}, found no file")
        out[label] = Path(path)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument(
        "--photos", choices=("eval", "train"), default="eval", help="the photo split (default eval)"
    )
    p.add_argument("--confidence", type=float, default=0.4)
    p.add_argument("--blend", default=None, help="back-projection strengths a in [0, 1] (comma-separated)")
    p.add_argument("--held-out", action="store_true", help="also the bench's held-out views measure")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also a saved JBUStack (JBUStack.save's path), reported as LABEL; repeatable",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    checkpoints = parse_checkpoints(args.checkpoint, p)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        p.error(f"expected --methods from {', '.join(METHODS)}; got {args.methods!r}")
    if not 0.0 <= args.confidence < 1.0:
        p.error(f"expected --confidence in [0, 1), got {args.confidence}")
    alphas = parse_floats(args.blend, "--blend", p) if args.blend is not None else []

    from featup.backbones import create_backbone
    from featup.eval.photos import EVAL_PHOTOS, TRAIN_PHOTOS
    from featup.eval.real_bench import cam_faithfulness

    torch.manual_seed(0)
    names = EVAL_PHOTOS if args.photos == "eval" else TRAIN_PHOTOS
    bb = create_backbone("efficientnet_lite0", pretrained=True, layer="head")
    labels, images = windows(names)
    with torch.inference_mode():
        lr = torch.cat([bb(images[i : i + 16]) for i in range(0, len(images), 16)])
        conf, top1 = bb.head_logits(lr).softmax(-1).max(-1)
    keep = [i for i in range(len(images)) if float(conf[i]) >= args.confidence]
    if not keep:
        raise SystemExit(f"no window has top-1 confidence >= {args.confidence}")
    sel = torch.tensor(keep)
    images, lr, top1 = images[sel], lr[sel], top1[sel]
    labels = [labels[i] for i in keep]
    photo_of = [label.split("@")[0] for label in labels]
    print(f"{len(conf)} windows, {len(keep)} with top-1 confidence >= {args.confidence}", file=sys.stderr)
    with torch.inference_mode():
        cam_lr = bb.class_activation_map(lr, top1)[:, None]  # (N, 1, h, w)

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([bb.logits(x[i : i + 16]).softmax(-1) for i in range(0, len(x), 16)])

    held_out = HeldOut(names) if args.held_out else None
    runs: list[tuple[str, str, float | None, Callable]] = []
    for name in [*methods, *checkpoints]:
        up = upsampler(name, checkpoint=checkpoints.get(name))
        runs.append((name, name, None, up))
        if alphas and (name in BACK_PROJECTED or name in checkpoints):
            pre = upsampler(name, back_projection=False, checkpoint=checkpoints.get(name))
            own = getattr(up, "consistency_strength", 1.0) if getattr(up, "consistency", True) else 0.0
            runs.extend((f"{name} a={a:g}", name, a, blended(pre, a)) for a in alphas if a != own)
    if "bilinear" not in methods:
        runs.append(("bilinear", "bilinear", None, upsampler("bilinear")))
    runs.sort(key=lambda run: run[0] != "bilinear")  # the reference of the paired differences comes first
    rows, ref = [], None
    for label, name, alpha, up in runs:
        t0 = time.perf_counter()
        err = check_linear(up, bb, lr[:1], cam_lr[:1], images[:1], top1[:1])
        if err > 1e-3:
            raise SystemExit(
                f"{label}: the upsampled CAM differs from the CAM of the upsampled features ({err:.2g})"
            )
        with torch.inference_mode():
            cams = torch.cat([up(cam_lr[i : i + 1], images[i : i + 1])[:, 0] for i in range(len(images))])
        drop = per_window(images, cams, top1, probs)
        ref = drop if ref is None else ref
        row = {"method": label, "base": name, "alpha": alpha, **cam_faithfulness(images, cams, top1, probs)}
        row.update(paired(drop, ref, photo_of))
        row["linearity_error"] = err
        if held_out is not None:
            row["held_out_cos"] = held_out(up)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(
            f"| {label} | {row['average_drop']:.1f} | {row['average_increase']:.1f} | "
            f"{row['drop_vs_bilinear']:+.1f} ± {row['drop_vs_bilinear_se']:.1f} | "
            + " / ".join(f"{v:+.1f}" for v in row["drop_vs_bilinear_by_photo"].values())
            + (f" | {row['held_out_cos']:.4f}" if held_out is not None else "")
            + " |",
            flush=True,
        )
    result = {"photos": list(names), "windows": labels, "n_windows": len(labels), "rows": rows}
    result["command"] = "python tools/cam_windows.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
