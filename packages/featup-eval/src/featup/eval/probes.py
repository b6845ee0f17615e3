"""Linear probes (Section 4.2, Table 1): semantic segmentation (COCO-Stuff, 27 classes) and depth.

The protocol, as in the paper and its supplement 6.9.1:

1. :func:`export_features` runs the frozen backbone over the training split once and writes the low-res
   features (float16) with the labels pooled to the feature grid (majority class per cell; mean depth) to
   shards on disk. It is resumable: finished shards are skipped.
2. :func:`train_probe` trains a 1x1 linear layer on those low-res features: cross-entropy over the 27 coarse
   classes, or for depth the scale-and-shift-invariant MSE of MiDaS (:func:`ssi_loss`) on the pseudo-depth.
3. :func:`evaluate_probes` freezes both probes and applies them to each method's features at image
   resolution, scoring mIoU and pixel accuracy, and RMSE and the delta > 1.25 rate after the least-squares
   scale-and-shift alignment that relative (pseudo-)depth needs.

:func:`run_probes` chains the three for a list of Table 1 methods, with results stored per method so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from featup.core.checkpoint import CheckpointError, CheckpointMixin, load_checkpoint, save_checkpoint
from featup.eval._confusion import confusion_matrix, segmentation_scores
from featup.eval._io import ResultStore, format_number, markdown_table, read_json, write_json
from featup.eval._runner import evaluate_methods
from featup.eval.datasets import IGNORE_INDEX, open_probe_dataset
from featup.eval.devices import loader_options, module_device, resolve_device, to_device
from featup.eval.methods import (
    METHODS,
    FeatureMethod,
    MethodConfig,
    load_backbone,
    parse_methods,
)

__all__ = [
    "LinearProbe",
    "ProbeScores",
    "depth_errors",
    "evaluate_probes",
    "export_features",
    "iter_exported",
    "pool_depth",
    "pool_labels",
    "probe_table",
    "run_probes",
    "scale_shift_align",
    "ssi_loss",
    "train_probe",
]


class LinearProbe(nn.Module, CheckpointMixin):
    """A 1x1 convolution from features to class logits (or to one depth channel).

    Shape:
        - feats: (B, dim, H, W)
        - output: (B, n_out, H, W)
    """

    def __init__(self, dim: int, n_out: int) -> None:
        super().__init__()
        if dim < 1 or n_out < 1:
            raise ValueError(f"expected positive dim and n_out, got dim={dim}, n_out={n_out}")
        self.dim, self.n_out = dim, n_out
        self.linear = nn.Conv2d(dim, n_out, 1)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_out": self.n_out}

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LinearProbe:
        """Rebuild a probe (in eval mode) from a checkpoint of :meth:`save` or :func:`train_probe` (whose
        optimizer state, stored beside the weights for resuming, is skipped)."""
        tensors, cfg = load_checkpoint(path, map_location)
        if cfg.get("class") != cls.__name__:
            raise CheckpointError(
                f"expected a {cls.__name__} checkpoint, got one saved from {cfg.get('class')!r} ({path})"
            )
        probe = cls(**cfg.get("kwargs", {}))
        try:
            probe.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not match {cls.__name__}: {exc}") from None
        return probe.to(map_location).eval()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features (B,{self.dim},H,W), got shape {tuple(feats.shape)}")
        return self.linear(feats.to(self.linear.weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# label pooling and depth losses / metrics


def pool_labels(
    seg: torch.Tensor, size: Sequence[int], n_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Majority class of each feature cell; a cell that is mostly unlabeled becomes ``ignore_index``.

    Shape:
        - seg: (B, H, W) int64 in [0, n_classes) or ``ignore_index``
        - output: (B, h, w) int64
    """
    if seg.dim() != 3:
        raise ValueError(f"expected labels (B,H,W), got shape {tuple(seg.shape)}")
    idx = seg.long().clone()
    idx[idx == ignore_index] = n_classes
    if int(idx.max()) > n_classes or int(idx.min()) < 0:
        raise ValueError(
            f"expected labels in [0, {n_classes}) or {ignore_index}, "
            f"got range [{int(seg.min())}, {int(seg.max())}]"
        )
    onehot = F.one_hot(idx, n_classes + 1).permute(0, 3, 1, 2).float()
    frac = F.adaptive_avg_pool2d(onehot, tuple(size))
    out = frac[:, :n_classes].argmax(1)
    return out.masked_fill(frac[:, n_classes] > 0.5, ignore_index)


def pool_depth(depth: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Mean of the valid (finite, positive) depth in each feature cell; 0 where a cell has none.

    Shape:
        - depth: (B, H, W)
        - output: (B, h, w)
    """
    if depth.dim() != 3:
        raise ValueError(f"expected depth (B,H,W), got shape {tuple(depth.shape)}")
    valid = (torch.isfinite(depth) & (depth > 0)).float()[:, None]
    total = F.adaptive_avg_pool2d(torch.nan_to_num(depth.float(), 0.0)[:, None] * valid, tuple(size))
    count = F.adaptive_avg_pool2d(valid, tuple(size))
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))[:, 0]


def scale_shift_align(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per image, the scale s and shift t minimising ``sum_mask (s * pred + t - target)^2``; returns s*pred+t.

    Shape:
        - pred, target: (B, H, W); mask: (B, H, W) bool, default all pixels
        - output: (B, H, W)
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"expected pred and target (B,H,W) of one shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    m = torch.ones_like(pred) if mask is None else mask.to(pred.dtype)
    n = m.sum((1, 2)).clamp_min(1)
    sp, st = (m * pred).sum((1, 2)), (m * target).sum((1, 2))
    spp, spt = (m * pred * pred).sum((1, 2)), (m * pred * target).sum((1, 2))
    det = n * spp - sp * sp
    ok = det.abs() > 1e-12
    scale = torch.where(
        ok, (n * spt - sp * st) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det)
    )
    shift = (st - scale * sp) / n
    return scale[:, None, None] * pred + shift[:, None, None]


def ssi_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiDaS's scale-and-shift-invariant MSE: the MSE after :func:`scale_shift_align` (differentiable).

    Shape:
        - pred, target: (B, H, W); mask: optional (B, H, W) bool
        - output: scalar
    """
    aligned = scale_shift_align(pred, target, mask)
    m = torch.ones_like(pred) if mask is None else mask.to(pred.dtype)
    return ((aligned - target) ** 2 * m).sum() / m.sum().clamp_min(1)


def depth_errors(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Summed squared error, pixel count and count of delta < 1.25 after per-image scale-and-shift alignment.

    delta = max(y / y*, y* / y); predictions are clamped to a tiny positive value first (an aligned relative
    depth may dip below zero, which counts as a miss). Sums, not means, so batches can be accumulated.

    Shape:
        - pred, target: (B, H, W); mask: optional (B, H, W) bool (default: finite, positive targets)
    """
    valid = torch.isfinite(target) & (target > 0)
    if mask is not None:
        valid &= mask.bool()
    pred, target = pred.double(), torch.nan_to_num(target.double(), 1.0)
    aligned = scale_shift_align(pred, target, valid).clamp_min(1e-8)
    err = (aligned - target)[valid]
    ratio = torch.maximum(aligned / target, target / aligned)[valid]
    return {"sq_err": float((err**2).sum()), "count": int(valid.sum()), "delta_ok": int((ratio < 1.25).sum())}


# ----------------------------------------------------------------------------------------------------------
# feature export


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": [s["name"] for s in samples]}
    for key in ("image", "seg", "depth"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out


def export_features(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    n_classes: int = 27,
    batch_size: int = 8,
    meta: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> Path:
    """Write the backbone's low-res features of ``dataset`` with grid-pooled labels to ``out_dir``.

    One ``shard_NNNNN.safetensors`` per batch (``feats`` float16 (b,C,h,w); ``seg`` uint8 (b,h,w) and/or
    ``depth`` float32 (b,h,w) when the dataset has them) and ``manifest.json`` with ``meta`` (backbone,
    split, image size...). With ``resume``, shards already on disk are kept; a manifest written with other
    ``meta`` raises ValueError instead of mixing two exports. Images are decoded by ``num_workers``
    ``DataLoader`` workers (pinned for CUDA) and featurized on ``device`` (default: the backbone's).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    n = len(dataset)  # type: ignore[arg-type]
    n_shards = math.ceil(n / batch_size)
    manifest = {
        "meta": meta or {},
        "n_images": n,
        "batch_size": batch_size,
        "n_shards": n_shards,
        "n_classes": n_classes,
    }
    mpath = out_dir / "manifest.json"
    if mpath.is_file() and resume:
        old = read_json(mpath)
        if {k: old.get(k) for k in manifest} != manifest:
            raise ValueError(
                f"{out_dir} holds an export of another configuration ({old.get('meta')}); "
                f"use another --out folder or --no-resume"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n_shards) if not (resume and (out_dir / f"shard_{i:05d}.safetensors").is_file())]
    if todo:
        write_json(mpath, {**manifest, "complete": False})
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), disable=not progress, desc="export features")
    device = module_device(backbone) if device is None else torch.device(device)
    # the shards still to write, in order: only the very last shard can be short, so batches = shards
    indices = [j for i in todo for j in range(i * batch_size, min(n, (i + 1) * batch_size))]
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate,
        **loader_options(device, num_workers),
    )
    for i, batch in zip(todo, loader):
        batch = to_device(batch, device)
        with torch.no_grad():
            feats = backbone(batch["image"])
        if feats.dim() != 4:
            raise ValueError(f"expected backbone features (B,C,h,w), got shape {tuple(feats.shape)}")
        tensors = {"feats": feats.to(torch.float16)}
        size = feats.shape[-2:]
        if "seg" in batch:
            tensors["seg"] = pool_labels(batch["seg"], size, n_classes).to(torch.uint8)
        if "depth" in batch:
            tensors["depth"] = pool_depth(batch["depth"], size).float()
        save_checkpoint(out_dir / f"shard_{i:05d}.safetensors", tensors, {"shard": i, "names": batch["name"]})
        bar.update(1)
    bar.close()
    write_json(
        mpath, {**manifest, "complete": True, "feat_shape": list(_shard(out_dir, 0)["feats"].shape[1:])}
    )
    return out_dir


def _shard(out_dir: Path, i: int) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / f"shard_{i:05d}.safetensors")[0]


def iter_exported(
    export_dir: str | os.PathLike, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the shards of :func:`export_features` (features back in float32), optionally shuffled."""
    export_dir = Path(export_dir)
    mpath = export_dir / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"expected an exported feature folder with manifest.json at {export_dir}")
    manifest = read_json(mpath)
    if not manifest.get("complete"):
        raise ValueError(f"the export in {export_dir} is incomplete; rerun the export to finish it")
    order = (
        torch.randperm(manifest["n_shards"], generator=generator)
        if shuffle
        else torch.arange(manifest["n_shards"])
    )
    for i in order.tolist():
        shard = _shard(export_dir, i)
        shard["feats"] = shard["feats"].float()
        yield shard


# ----------------------------------------------------------------------------------------------------------
# probe training


def _cuda_devices() -> list[int]:
    """Every CUDA device (``torch.manual_seed`` seeds them all, so a fork must restore them all)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch: a function of (seed, epoch) alone, so a resumed run shuffles
    exactly as the uninterrupted one (replaying draws from one shared generator cannot: each epoch makes a
    data-dependent number of them)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(epoch)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _optimizer_tensors(optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``optim.<param>.<key>`` tensors (for safetensors)."""
    out = {}
    for idx, state in optim.state_dict()["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            out[f"optim.{idx}.{key}"] = value
    return out


def _load_optimizer_tensors(optim: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optim.load_state_dict({"state": state, "param_groups": optim.state_dict()["param_groups"]})


def train_probe(
    export_dir: str | os.PathLike,
    task: str,
    *,
    n_classes: int = 27,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Train a linear probe on exported low-res features (Adam).

    Args:
        export_dir: folder written by :func:`export_features`.
        task: ``"seg"`` (cross-entropy over ``n_classes``, cells marked 255 ignored) or ``"depth"``
            (:func:`ssi_loss` over cells with valid depth).
        epochs: passes over the export.
        seed: seeds the initial weights and, with the epoch, each epoch's shuffling.
        checkpoint_path: where the probe and the optimizer state are saved after each epoch (with the
            epoch count); a finished probe is returned as is, an unfinished one resumes and continues
            exactly as the uninterrupted run would (bitwise on the same machine and device).
        device: where the probe trains (the shards are moved there one at a time).

    Returns:
        The probe in eval mode, on ``device``.
    """
    if task not in ("seg", "depth"):
        raise ValueError(f"expected task 'seg' or 'depth', got {task!r}")
    device = torch.device(device)
    manifest = read_json(Path(export_dir) / "manifest.json")
    if "feat_shape" not in manifest:
        raise ValueError(f"the export in {export_dir} is incomplete; rerun the export to finish it")
    dim = int(manifest["feat_shape"][0])
    with torch.random.fork_rng(devices=_cuda_devices()):  # the caller's generators are left as they were
        torch.manual_seed(seed)
        probe = LinearProbe(dim, n_classes if task == "seg" else 1)
    probe.to(device)
    optim = torch.optim.Adam(probe.parameters(), lr=lr)
    start = 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).with_suffix(".safetensors").is_file():
        # on the CPU: load_state_dict moves weights and moments to the parameters' device, keeps Adam's step
        tensors, cfg = load_checkpoint(Path(checkpoint_path).with_suffix(".safetensors"))
        if cfg.get("kwargs") != probe.config() or cfg.get("extra", {}).get("task") != task:
            raise ValueError(
                f"{checkpoint_path} holds a different probe ({cfg.get('kwargs')}); use another --out"
            )
        probe.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
        start = int(cfg["extra"]["epoch"])
        optim_state = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        if optim_state:  # checkpoints from before the optimizer was saved resume with a fresh Adam
            _load_optimizer_tensors(optim, optim_state)
    bar = tqdm(total=epochs, initial=min(start, epochs), disable=not progress, desc=f"train {task} probe")
    probe.train()
    for epoch in range(start, epochs):
        gen = _epoch_generator(seed, epoch)
        total, count = 0.0, 0
        for shard in iter_exported(export_dir, shuffle=True, generator=gen):
            if task not in shard:
                raise ValueError(
                    f"the export in {export_dir} has no {task!r} targets (dataset without them?)"
                )
            feats, target = shard["feats"].to(device), shard[task].to(device)
            perm = torch.randperm(feats.shape[0], generator=gen).to(device)
            for s in range(0, feats.shape[0], batch_size):
                idx = perm[s : s + batch_size]
                out = probe(feats[idx])
                if task == "seg":
                    t = target[idx].long()
                    if bool((t == IGNORE_INDEX).all()):
                        continue
                    loss = F.cross_entropy(out, t, ignore_index=IGNORE_INDEX)
                else:
                    t = target[idx]
                    loss = ssi_loss(out[:, 0], t, t > 0)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total, count = total + float(loss.detach()), count + 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / max(count, 1):.4g}")
        if checkpoint_path is not None:
            _save_probe(probe, optim, checkpoint_path, {"epoch": epoch + 1, "task": task, "epochs": epochs})
    bar.close()
    return probe.eval()


def _save_probe(
    probe: LinearProbe, optim: torch.optim.Optimizer, path: str | os.PathLike, extra: dict[str, Any]
) -> Path:
    """Weights and optimizer state in one file, written atomically (``LinearProbe.load`` skips the latter)."""
    cfg = {"class": type(probe).__name__, "kwargs": probe.config(), "extra": extra}
    return save_checkpoint(path, {**probe.state_dict(), **_optimizer_tensors(optim)}, cfg)


# ----------------------------------------------------------------------------------------------------------
# evaluation


class ProbeScores:
    """Running sums for the probe metrics; ``state``/``from_state`` make a partial evaluation resumable."""

    def __init__(self, n_classes: int, device: str | torch.device = "cpu") -> None:
        self.n_classes = n_classes
        self.conf = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)
        self.sq_err, self.depth_count, self.delta_ok, self.n_images = 0.0, 0, 0, 0

    def add_seg(self, logits: torch.Tensor, seg: torch.Tensor) -> None:
        self.conf += confusion_matrix(logits.argmax(1), seg, self.n_classes).to(self.conf.device)

    def add_depth(self, pred: torch.Tensor, depth: torch.Tensor) -> None:
        e = depth_errors(pred, depth)
        self.sq_err += e["sq_err"]
        self.depth_count += e["count"]
        self.delta_ok += e["delta_ok"]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_images": self.n_images}
        if int(self.conf.sum()) > 0:
            s = segmentation_scores(self.conf)
            out.update(accuracy=s["aacc"], miou=s["miou"])
        if self.depth_count > 0:
            out.update(
                rmse=math.sqrt(self.sq_err / self.depth_count), delta125=self.delta_ok / self.depth_count
            )
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"conf": self.conf}, {
            "sq_err": self.sq_err,
            "depth_count": self.depth_count,
            "delta_ok": self.delta_ok,
            "n_images": self.n_images,
        }

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], device: str | torch.device = "cpu"
    ) -> ProbeScores:
        self = cls(int(tensors["conf"].shape[0]), device)
        self.conf = tensors["conf"].long().to(device)
        self.sq_err, self.depth_count = float(cfg["sq_err"]), int(cfg["depth_count"])
        self.delta_ok, self.n_images = int(cfg["delta_ok"]), int(cfg["n_images"])
        return self


def evaluate_probes(
    method: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    seg_probe: LinearProbe | None = None,
    depth_probe: LinearProbe | None = None,
    n_classes: int = 27,
    batch_size: int = 8,
    state_path: str | os.PathLike | None = None,
    save_every: int = 10,
    progress: bool = True,
    desc: str = "evaluate",
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Apply frozen probes to ``method(image)`` (features at image resolution) over ``dataset``.

    Returns ``{"accuracy", "miou"}`` (percent) when ``seg_probe`` is given and the data has ``seg``, and
    ``{"rmse", "delta125"}`` (delta as a fraction, like the paper's table) for depth, plus ``n_images``.
    With ``state_path``, the running sums are saved every ``save_every`` batches and a rerun continues.
    Batches are moved to ``device`` (default: the probes' device), where ``method`` must run.

    Shape:
        - method: (B, 3, H, W) -> (B, C, H, W)
    """
    if seg_probe is None and depth_probe is None:
        raise ValueError("expected at least one of seg_probe and depth_probe, got neither")
    if device is None:
        device = module_device(seg_probe if seg_probe is not None else depth_probe)
    device = torch.device(device)
    scores = ProbeScores(n_classes, device)
    state = Path(state_path).with_suffix(".safetensors") if state_path is not None else None
    if state is not None and state.is_file():
        scores = ProbeScores.from_state(*load_checkpoint(state), device=device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate,
        **loader_options(device, num_workers),
    )
    done_batches = scores.n_images // batch_size
    bar = tqdm(total=len(loader), initial=done_batches, disable=not progress, desc=desc)
    for b, batch in enumerate(loader):
        if b < done_batches:
            continue
        batch = to_device(batch, device)
        image = batch["image"]
        with torch.no_grad():
            feats = method(image)
            if tuple(feats.shape[-2:]) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"expected features at image resolution {tuple(image.shape[-2:])}, "
                    f"got {tuple(feats.shape)}"
                )
            if seg_probe is not None and "seg" in batch:
                scores.add_seg(seg_probe(feats), batch["seg"])
            if depth_probe is not None and "depth" in batch:
                scores.add_depth(depth_probe(feats)[:, 0], batch["depth"])
        scores.n_images += image.shape[0]
        bar.update(1)
        if state is not None and ((b + 1) % save_every == 0) and b + 1 < len(loader):
            save_checkpoint(state, *scores.state())
    bar.close()
    if state is not None and state.is_file():
        state.unlink()
        state.with_suffix(".json").unlink(missing_ok=True)
    return scores.result()


def probe_table(results: dict[str, dict[str, Any]]) -> str:
    """The paper's Table 1 probe columns as markdown (rows in the order given)."""
    rows = [
        [
            METHODS.get(m, m),
            format_number(r.get("accuracy")),
            format_number(r.get("miou")),
            format_number(r.get("rmse")),
            format_number(r.get("delta125"), 3),
        ]
        for m, r in results.items()
    ]
    return markdown_table(["Method", "Acc. ↑", "mIoU ↑", "RMSE ↓", "δ>1.25 ↑"], rows)


def run_probes(
    backbone: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | str | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    image_size: int = 224,
    train_split: str = "train2017",
    val_split: str = "val2017",
    depth_dir: str | os.PathLike | None = None,
    image_list: str | os.PathLike | None = None,
    max_train_images: int | None = None,
    max_val_images: int | None = None,
    batch_size: int = 8,
    probe_epochs: int = 10,
    probe_lr: float = 1e-3,
    method_cfg: MethodConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """Everything behind ``featup probe``: export, train both probes, evaluate every method; JSON per method.

    Everything runs on ``device`` (default :func:`~featup.eval.devices.default_device`: CUDA when available);
    ``num_workers`` ``DataLoader`` processes decode the images.

    Writes ``out_dir/features/`` (the export), ``out_dir/probes/{seg,depth}_probe.safetensors``,
    ``out_dir/upsamplers/`` (trained upsamplers) and ``out_dir/probe_results.json``. Returns the results in
    Table 1 order.
    """
    names = parse_methods(methods)
    cfg = method_cfg or MethodConfig()
    out_dir = Path(out_dir)
    device = resolve_device(device)
    bb = load_backbone(backbone, weights=weights, pretrained=pretrained).to(device)
    train = open_probe_dataset(
        data, train_split, image_size, depth_dir=depth_dir, max_images=max_train_images
    )
    val = open_probe_dataset(
        data, val_split, image_size, depth_dir=depth_dir, image_list=image_list, max_images=max_val_images
    )
    tasks = [t for t, ok in (("seg", hasattr(train, "label_files")), ("depth", train.has_depth)) if ok]
    run_config = {
        "backbone": backbone,
        "weights": str(weights) if weights else None,
        "pretrained": pretrained,
        "data": str(Path(data).resolve()),
        "image_size": image_size,
        "train_split": train_split,
        "val_split": val_split,
        "n_train": len(train),
        "n_val": len(val),
        "tasks": tasks,
        "probe_epochs": probe_epochs,
        "probe_lr": probe_lr,
    }
    export = export_features(
        bb,
        train,
        out_dir / "features",
        batch_size=batch_size,
        resume=resume,
        progress=progress,
        num_workers=num_workers,
        device=device,
        meta={
            k: run_config[k] for k in ("backbone", "weights", "data", "image_size", "train_split", "n_train")
        },
    )
    feat_dim = int(read_json(export / "manifest.json")["feat_shape"][0])
    probes = {
        t: train_probe(
            export,
            t,
            epochs=probe_epochs,
            lr=probe_lr,
            seed=cfg.seed,
            progress=progress,
            checkpoint_path=out_dir / "probes" / f"{t}_probe",
            resume=resume,
            device=device,
        )
        for t in tasks
    }
    store = ResultStore(out_dir / "probe_results.json", run_config, resume=resume)

    def evaluate(name: str, method: FeatureMethod, tag: str) -> dict[str, Any]:
        return evaluate_probes(
            method,
            val,
            seg_probe=probes.get("seg"),
            depth_probe=probes.get("depth"),
            batch_size=batch_size,
            state_path=out_dir / "partial" / f"{name}-{tag}",
            progress=progress,
            desc=f"probe {name}",
            device=device,
            num_workers=num_workers,
        )

    return evaluate_methods(
        names,
        bb,
        evaluate,
        store=store,
        cfg=cfg,
        feat_dim=feat_dim,
        train_data=train,
        backbone_factory=partial(load_backbone, backbone, weights=weights, pretrained=pretrained),
        work_dir=out_dir,
        progress=progress,
        log=log,
        device=device,
    )
