"""CAM faithfulness of fixed and shipped upsamplers on many windows of the evaluation photos.

    python tools/cam_windows.py --json tools/results/cam_windows.json

`featup bench --real` scores CAM on the 8 evaluation windows, of which 6 are confident: one window moves the
mean by several points. This script takes 3 scales (shorter side 240 / 288 / 336 px) x 3 positions (top-left,
centre, bottom-right 224 px windows) x mirror of each evaluation photo (72 windows), keeps those where
EfficientNet-Lite0's top-1 confidence is >= ``--confidence``, and reports Average Drop / Increase (the bench's
``cam_faithfulness``) of the 1280-channel head's CAM for each method, with the two halves of the windows
(even / odd) as a noise gauge. Methods need no per-window fitting (the implicit upsampler is not included).
Numbers: docs/decisions.md#cam-49.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

METHODS = ("nearest", "bilinear", "bicubic", "jbu_classic", "bicubic_bp", "jbu_classic_bp", "jbu_shipped")


def windows(size: int = 224) -> tuple[list[str], torch.Tensor]:
    """The evaluation photos' windows: 3 scales x 3 positions x (as is, mirrored)."""
    from featup.eval.photos import EVAL_PHOTOS, load_photo

    labels, out = [], []
    for name in EVAL_PHOTOS:
        for side in (240, 288, 336):
            img = load_photo(name, side)
            h, w = img.shape[-2:]
            for top, left in sorted({(0, 0), ((h - size) // 2, (w - size) // 2), (h - size, w - size)}):
                crop = img[..., top : top + size, left : left + size]
                for mirror in (False, True):
                    out.append(crop.flip(-1) if mirror else crop)
                    labels.append(f"{name}@{side}/{top},{left}{' mirror' if mirror else ''}")
    return labels, torch.cat(out)


def upsampler(name: str) -> nn.Module:
    from featup.core import create_upsampler
    from featup.eval.pretrained import load_shipped_jbu

    if name == "jbu_shipped":
        return load_shipped_jbu()
    return create_upsampler(name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--confidence", type=float, default=0.4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        p.error(f"expected --methods from {', '.join(METHODS)}; got {args.methods!r}")
    if not 0.0 <= args.confidence < 1.0:
        p.error(f"expected --confidence in [0, 1), got {args.confidence}")

    from featup.backbones import create_backbone
    from featup.eval.real_bench import cam_faithfulness

    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", pretrained=True, layer="head")
    labels, images = windows()
    with torch.inference_mode():
        lr = torch.cat([bb(images[i : i + 8]) for i in range(0, len(images), 8)])
        conf, top1 = bb.head_logits(lr).softmax(-1).max(-1)
    keep = [i for i in range(len(images)) if float(conf[i]) >= args.confidence]
    if not keep:
        raise SystemExit(f"no window has top-1 confidence >= {args.confidence}")
    sel = torch.tensor(keep)
    print(f"{len(images)} windows, {len(keep)} with top-1 confidence >= {args.confidence}", file=sys.stderr)

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([bb.logits(x[i : i + 8]).softmax(-1) for i in range(0, len(x), 8)])

    rows = []
    for name in methods:
        t0 = time.perf_counter()
        up = upsampler(name).eval()
        cams = []
        for i in keep:
            with torch.inference_mode():
                cams.append(
                    bb.class_activation_map(up(lr[i : i + 1], images[i : i + 1]).float(), top1[i : i + 1])
                )
        cams_t = torch.cat(cams)
        row = {"method": name, **cam_faithfulness(images[sel], cams_t, top1[sel], probs)}
        row["average_drop_halves"] = [
            cam_faithfulness(images[sel][k::2], cams_t[k::2], top1[sel][k::2], probs)["average_drop"]
            for k in (0, 1)
        ]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(
            f"| {name} | {row['average_drop']:.1f} | {row['average_increase']:.1f} | "
            + " / ".join(f"{h:.1f}" for h in row["average_drop_halves"])
            + " |",
            flush=True,
        )
    result = {"windows": [labels[i] for i in keep], "n_windows": len(keep), "rows": rows}
    result["command"] = "python tools/cam_windows.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
