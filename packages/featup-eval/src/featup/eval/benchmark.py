"""The synthetic benchmark: every upsampler against features whose ideal high-resolution version is known.

Protocol (``run_benchmark``):

1. Draw a training split and an evaluation split of synthetic scenes (:mod:`featup.eval.synthetic`).
2. Extractor A (:class:`~featup.eval.synthetic.SyntheticExtractor` ``"a"``, stride 14) gives low-res features;
   its stride-1 map is the ground truth.
3. A linear probe is trained on the *low-res* training features and frozen (the paper's protocol).
4. Every registered upsampler is applied to the evaluation features. Learnable baselines (resize_conv, CARAFE,
   SAPA) are trained with the same multi-view objective and step budget as the JBU (``baseline_steps``; 0
   leaves them at initialisation, and the table says so). FeatUp's JBU is trained with ``train_jbu`` on the
   training split, the implicit upsampler is fitted per evaluation image with ``fit_implicit``, and the
   stride-1 map itself is the upper bound.
5. Scores against the ground truth: feature cosine similarity and MSE; the frozen probe's mIoU, pixel accuracy
   and boundary F-score against the scene labels.
6. Encoder-agnostic transfer: the JBU stack trained on extractor A (``feat_dim=None``) is applied unchanged to
   extractor B (other filters, 48 channels, stride 16), beside bilinear, a JBU trained on B itself and B's
   stride-1 upper bound.

``featup bench`` and ``tools/bench_synthetic.py`` print the markdown table and write the JSON.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from featup.eval.metrics import LinearProbe, feature_cosine, feature_mse, segmentation_scores
from featup.eval.synthetic import (
    CLASS_NAMES,
    EXTRACTOR_STRIDES,
    SyntheticExtractor,
    SyntheticSplit,
    synthetic_split,
)

__all__ = ["BenchConfig", "BenchResult", "format_table", "run_benchmark"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and budgets of one benchmark run.

    The training hyperparameters are this domain's, not the paper's Table 7 (which ``train_jbu`` /
    ``fit_implicit`` keep as presets): no flips and zoom <= 1.2 (the extractors' oriented filters are not
    flip- or scale-equivariant), box downsamplers of the stride, plain MSE, lr 1e-2. Why:
    docs/decisions.md#b1.

    Attributes:
        size: (H, W) of the scenes; both must be multiples of the stride of every extractor the run uses
            (A: 14, and B: 16 when ``transfer``; so multiples of 112 with transfer), else the feature cells
            do not tile the scene and every score drifts (docs/decisions.md#eval-fixes).
        n_train: training scenes (JBU and learnable baselines train on them; the probe trains on their
            low-res features).
        n_eval: evaluation scenes (every method is scored on all of them; the implicit upsampler is fitted
            on each); fewer than 12 make the segmentation scores swing more than the methods differ
            (docs/decisions.md#b1).
        jbu_steps: ``train_jbu`` steps (the paper: 2000 on a GPU; this CPU budget is why ``lr`` is 10x the
            paper's 1e-3).
        baseline_steps: steps for learnable baselines with the same objective; None = ``jbu_steps``,
            0 (default, for time) = leave them untrained, and the table says so.
        implicit_steps: ``fit_implicit`` steps per evaluation image.
        implicit_pca_dim: PCA components the implicit upsampler fits.
        probe_steps: linear probe optimisation steps.
        batch_size, n_jitters, max_pad, max_zoom, lr, downsampler: JBU training hyperparameters.
        p_zoom, p_flip: jitter probabilities of both JBU training and implicit fitting.
        kernel_size: the JBU downsampler's kernel; None = the extractor's stride.
        uncertainty: JBU training learns eq. 1's per-pixel scale (True, the paper) or uses a plain mean
            squared error (False, the default here: see above).
        implicit_jitters, implicit_max_zoom, implicit_lr, implicit_downsampler: implicit fitting
            hyperparameters; implicit_kernel_size: its downsampler kernel, None = the extractor's stride.
        transfer: also measure extractor B (transfer of the A-trained JBU).
        transfer_train_b: also train a JBU on extractor B, for reference.
        seed: seed of the scenes and every training run.
    """

    size: tuple[int, int] = (112, 112)
    n_train: int = 48
    n_eval: int = 12
    jbu_steps: int = 100
    baseline_steps: int | None = 0
    implicit_steps: int = 200
    implicit_pca_dim: int = 32
    probe_steps: int = 300
    batch_size: int = 2
    n_jitters: int = 2
    max_pad: int = 30
    max_zoom: float = 1.2
    p_zoom: float = 0.5
    p_flip: float = 0.0
    lr: float = 1e-2
    downsampler: str = "simple"
    kernel_size: int | None = None
    uncertainty: bool = False
    implicit_jitters: int = 2
    implicit_max_zoom: float = 1.2
    implicit_lr: float = 1e-2
    implicit_downsampler: str = "simple"
    implicit_kernel_size: int | None = None
    transfer: bool = True
    transfer_train_b: bool = True
    seed: int = 0

    @classmethod
    def quick(cls) -> BenchConfig:
        """A configuration that runs in seconds, for tests (the numbers mean little)."""
        return cls(
            size=(112, 112),
            n_train=4,
            n_eval=2,
            jbu_steps=2,
            baseline_steps=0,
            implicit_steps=2,
            implicit_pca_dim=4,
            probe_steps=40,
            batch_size=2,
            n_jitters=1,
            implicit_jitters=1,
        )

    def __post_init__(self) -> None:
        self.validate()

    def strides(self) -> dict[str, int]:
        """The stride of every extractor this configuration runs (``"a"``, and ``"b"`` with ``transfer``)."""
        return {v: EXTRACTOR_STRIDES[v] for v in (("a", "b") if self.transfer else ("a",))}

    def validate(self) -> BenchConfig:
        """Check the configuration (also run on construction and by ``dataclasses.replace``).

        Raises:
            ValueError: a scene size that is not a multiple of every extractor's stride, or a count or a
                step budget out of range.
        """
        size = tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
            raise ValueError(f"expected size (H, W) as two ints, got {self.size!r}")
        h, w = size
        strides = self.strides()
        lcm = math.lcm(*strides.values())
        if min(h, w) < lcm or h % lcm or w % lcm:
            named = ", ".join(f"extractor {k.upper()}: {s}" for k, s in strides.items())
            raise ValueError(
                f"expected a scene size whose height and width are multiples of every extractor's stride "
                f"({named}; so multiples of {lcm}, e.g. {lcm}x{lcm}), got {h}x{w}: otherwise the feature "
                f"cells do not tile the scene"
            )
        for name in ("n_train", "n_eval", "probe_steps", "batch_size", "n_jitters", "implicit_jitters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("jbu_steps", "implicit_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"expected {name} >= 0, got {getattr(self, name)}")
        return self


@dataclass
class BenchResult:
    """What a run measured.

    Attributes:
        config: the run's :class:`BenchConfig` as a dict.
        rows: one dict per method on extractor A (method, training, cosine, mse, miou, accuracy,
            boundary_f, seconds).
        transfer: the same for extractor B.
        machine: where it ran.
        examples: for figures: the first evaluation image and, per method, its (1, C, H, W) features.
        models: the trained JBU stacks (``"jbu"``, ``"jbu_b"``) and the first fitted implicit upsampler.
    """

    config: dict[str, Any]
    rows: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    machine: dict[str, Any]
    examples: dict[str, torch.Tensor] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "machine": self.machine, "rows": self.rows, "transfer": self.transfer}


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class _Scorer:
    """Scores high-res features of the evaluation split for one extractor (ground truth + frozen probe)."""

    def __init__(
        self, extractor: SyntheticExtractor, train: SyntheticSplit, evals: SyntheticSplit, cfg: BenchConfig
    ):
        with torch.no_grad():
            train_lr = torch.cat([extractor(x) for x in train.images.split(16)])
            self.lr = torch.cat([extractor(x) for x in evals.images.split(16)])
            self.gt = torch.cat([extractor.dense(x) for x in evals.images.split(16)])
        self.probe = LinearProbe(extractor.feat_dim, len(CLASS_NAMES)).fit(
            train_lr, train.labels, steps=cfg.probe_steps, seed=cfg.seed
        )
        self.evals = evals

    def score(self, hr: torch.Tensor) -> dict[str, float]:
        if hr.shape != self.gt.shape:
            raise ValueError(f"expected upsampled features {tuple(self.gt.shape)}, got {tuple(hr.shape)}")
        with torch.no_grad():
            pred = torch.cat([self.probe.predict(x) for x in hr.split(8)])
        seg = segmentation_scores(pred, self.evals.labels, len(CLASS_NAMES))
        return {"cosine": feature_cosine(hr, self.gt), "mse": feature_mse(hr, self.gt), **seg}


def _apply(up: nn.Module, lr: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([up(f[None], x[None]) for f, x in zip(lr, images)])


def _make_baseline(name: str, feat_dim: int, seed: int) -> nn.Module:
    """A registered upsampler with seeded initial weights (untrained learnable rows must repeat too)."""
    from featup.core import create_upsampler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return create_upsampler(name, feat_dim=feat_dim)
        except TypeError:  # a factory without feat_dim: it has no per-feature parameters
            return create_upsampler(name)


def _train(
    extractor: nn.Module, images: torch.Tensor, steps: int, cfg: BenchConfig, upsampler=None, progress=False
):
    from featup.core.training import train_jbu

    return train_jbu(
        extractor,
        images,
        steps=steps,
        upsampler=upsampler,
        batch_size=cfg.batch_size,
        n_jitters=cfg.n_jitters,
        lr=cfg.lr,
        max_pad=cfg.max_pad,
        max_zoom=cfg.max_zoom,
        p_zoom=cfg.p_zoom,
        p_flip=cfg.p_flip,
        uncertainty=cfg.uncertainty,
        seed=cfg.seed,
        progress=progress,
        downsampler=cfg.downsampler,
        kernel_size=cfg.kernel_size or int(getattr(extractor, "stride", 16)),
    )


def _row(method: str, training: str, scores: dict[str, float], seconds: float) -> dict[str, Any]:
    return {"method": method, "training": training, **scores, "seconds": round(seconds, 2)}


def run_benchmark(
    cfg: BenchConfig | None = None, *, progress: bool = True, log: Log | None = None
) -> BenchResult:
    """Run the synthetic benchmark (see the module docstring); returns every row and the trained models.

    Args:
        cfg: sizes and budgets (default :class:`BenchConfig`; :meth:`BenchConfig.quick` for tests).
        progress: show progress bars while training and fitting.
        log: called with a line of text as each method finishes (e.g. ``print``).
    """
    from featup.core import list_upsamplers

    cfg = (cfg or BenchConfig()).validate()
    log = log or (lambda _msg: None)
    train = synthetic_split("train", cfg.n_train, cfg.size, seed=cfg.seed)
    evals = synthetic_split("eval", cfg.n_eval, cfg.size, seed=cfg.seed)
    ext_a = SyntheticExtractor("a")
    scorer = _Scorer(ext_a, train, evals, cfg)
    rows: list[dict[str, Any]] = []
    examples: dict[str, torch.Tensor] = {
        "image": evals.images[:1],
        "lr": scorer.lr[:1],
        "stride-1": scorer.gt[:1],
    }
    models: dict[str, nn.Module] = {}
    baseline_steps = cfg.jbu_steps if cfg.baseline_steps is None else cfg.baseline_steps

    def add(method: str, training: str, hr: torch.Tensor, seconds: float) -> None:
        row = _row(method, training, scorer.score(hr), seconds)
        rows.append(row)
        examples[method] = hr[:1]
        log(_line(row))

    for name in list_upsamplers():
        if name in ("jbu", "implicit"):
            continue  # FeatUp's own upsamplers are trained below
        t0 = time.perf_counter()
        up = _make_baseline(name, ext_a.feat_dim, cfg.seed)
        learnable = any(p.requires_grad for p in up.parameters())
        training = "none (fixed)"
        if learnable and baseline_steps > 0:
            up = _train(ext_a, train.images, baseline_steps, cfg, upsampler=up)
            training = f"multi-view, {baseline_steps} steps"
        elif learnable:
            training = "UNTRAINED (initial weights)"
        add(name, training, _apply(up, scorer.lr, evals.images), time.perf_counter() - t0)

    t0 = time.perf_counter()
    jbu = _train(ext_a, train.images, cfg.jbu_steps, cfg, progress=progress)
    models["jbu"] = jbu
    add(
        "FeatUp JBU",
        f"multi-view, {cfg.jbu_steps} steps",
        _apply(jbu, scorer.lr, evals.images),
        time.perf_counter() - t0,
    )

    if cfg.implicit_steps > 0:
        from featup.core.training import fit_implicit

        t0 = time.perf_counter()
        outs = []
        for i in range(len(evals)):
            imp = fit_implicit(
                ext_a,
                evals.images[i : i + 1],
                steps=cfg.implicit_steps,
                n_jitters=cfg.implicit_jitters,
                lr=cfg.implicit_lr,
                pca_dim=cfg.implicit_pca_dim,
                max_pad=cfg.max_pad,
                max_zoom=cfg.implicit_max_zoom,
                p_zoom=cfg.p_zoom,
                p_flip=cfg.p_flip,
                downsampler=cfg.implicit_downsampler,
                kernel_size=cfg.implicit_kernel_size or ext_a.stride,
                seed=cfg.seed + i,
                progress=progress,
            )
            if i == 0:
                models["implicit"] = imp
            with torch.inference_mode():
                outs.append(imp.render(tuple(cfg.size)))
        add(
            "FeatUp implicit",
            f"per image, {cfg.implicit_steps} steps",
            torch.cat(outs),
            time.perf_counter() - t0,
        )

    add("stride-1 extractor (upper bound)", "n/a (ground truth)", scorer.gt, 0.0)

    transfer: list[dict[str, Any]] = []
    if cfg.transfer:
        from featup.core import create_upsampler

        ext_b = SyntheticExtractor("b")
        scorer_b = _Scorer(ext_b, train, evals, cfg)

        def add_b(method: str, training: str, hr: torch.Tensor, seconds: float) -> None:
            row = _row(method, training, scorer_b.score(hr), seconds)
            transfer.append(row)
            log("[extractor B] " + _line(row))

        for name in ("bilinear", "jbu_classic"):
            if name in list_upsamplers():
                t0 = time.perf_counter()
                add_b(
                    name,
                    "none (fixed)",
                    _apply(create_upsampler(name), scorer_b.lr, evals.images),
                    time.perf_counter() - t0,
                )
        t0 = time.perf_counter()
        add_b(
            "FeatUp JBU trained on A (transfer)",
            "none on B",
            _apply(jbu, scorer_b.lr, evals.images),
            time.perf_counter() - t0,
        )
        if cfg.transfer_train_b:
            t0 = time.perf_counter()
            jbu_b = _train(ext_b, train.images, cfg.jbu_steps, cfg, progress=progress)
            models["jbu_b"] = jbu_b
            add_b(
                "FeatUp JBU trained on B",
                f"multi-view, {cfg.jbu_steps} steps",
                _apply(jbu_b, scorer_b.lr, evals.images),
                time.perf_counter() - t0,
            )
        add_b("stride-1 extractor B (upper bound)", "n/a (ground truth)", scorer_b.gt, 0.0)

    return BenchResult(
        config={**asdict(cfg), "classes": list(CLASS_NAMES)},
        rows=rows,
        transfer=transfer,
        machine=_machine(),
        examples=examples,
        models=models,
    )


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['method']}: cos {row['cosine']:.4f}  mse {row['mse']:.4f}  mIoU {100 * row['miou']:.1f}  "
        f"acc {100 * row['accuracy']:.1f}  bF {100 * row['boundary_f']:.1f}  ({row['seconds']:.1f}s)"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of benchmark rows (mIoU, accuracy and boundary F in percent)."""
    header = ["method", "training", "cos sim ↑", "MSE ↓", "mIoU ↑", "acc ↑", "boundary F ↑", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r["method"],
            r["training"],
            f"{r['cosine']:.4f}",
            f"{r['mse']:.4f}",
            f"{100 * r['miou']:.1f}",
            f"{100 * r['accuracy']:.1f}",
            f"{100 * r['boundary_f']:.1f}",
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
