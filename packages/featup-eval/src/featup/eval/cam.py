"""CAM faithfulness (Sections 4.3, 6.10): Average Drop and Average Increase of CAMs from upsampled features.

The classifier is linear on max-pooled backbone features, ``logits = W · maxpool(f(x)) + b``, trained on the
training split. The CAM of class c on features F (at any resolution) is ``W_c · F[:, i, j]``: low-res features
give the usual 14x14 CAM, upsampled features a CAM at image resolution.

For each validation image whose label the classifier predicts correctly (6.10 follows RelevanceCAM's
selection), with Y = softmax confidence of the true class c on the image and O = the same on the CAM-masked
image (the top 50% of CAM values kept, the other 50% of pixels replaced by a Gaussian blur of the image):

    Average Drop     = (1/N) sum_i max(0, Y_i - O_i) / Y_i * 100      (lower is better)
    Average Increase = (1/N) sum_i 1[Y_i < O_i] * 100                  (higher is better)

(The paper's 6.10 prints the drop as a plain sum; the 1/N of an average, as in Grad-CAM++ where the metric
comes from, is what its Table 1 values imply.) The paper does not give the blur; we use sigma = 10 px at
224 px (scaled with the image size) and a kernel of 4 sigma on each side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from featup.core.checkpoint import CheckpointMixin, load_checkpoint, save_checkpoint
from featup.eval._io import ResultStore, format_number, markdown_table, read_json, write_json
from featup.eval._runner import evaluate_methods
from featup.eval.datasets import ImageFolder
from featup.eval.devices import loader_options, module_device, resolve_device, to_device
from featup.eval.methods import (
    METHODS,
    FeatureMethod,
    MethodConfig,
    load_backbone,
    parse_methods,
)

__all__ = [
    "MaxPoolClassifier",
    "average_drop",
    "average_increase",
    "cam_mask",
    "cam_masked_image",
    "cam_table",
    "class_activation_map",
    "evaluate_cam",
    "gaussian_blur",
    "run_cam",
    "select_correct",
    "train_classifier",
]


class MaxPoolClassifier(nn.Module, CheckpointMixin):
    """A linear classifier on spatially max-pooled features.

    Shape:
        - feats: (B, dim, h, w)
        - output: (B, n_classes) logits
    """

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        if dim < 1 or n_classes < 2:
            raise ValueError(f"expected dim >= 1 and n_classes >= 2, got dim={dim}, n_classes={n_classes}")
        self.dim, self.n_classes = dim, n_classes
        self.linear = nn.Linear(dim, n_classes)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_classes": self.n_classes}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features (B,{self.dim},h,w), got shape {tuple(feats.shape)}")
        return self.linear(feats.amax(dim=(2, 3)))


def class_activation_map(
    feats: torch.Tensor, classifier: MaxPoolClassifier, classes: torch.Tensor
) -> torch.Tensor:
    """CAM of ``classes[b]`` on ``feats[b]``: the class weight vector dotted with every feature vector.

    The bias is left out: it shifts every pixel of one CAM equally and so never changes which half is kept.

    Shape:
        - feats: (B, C, H, W); classes: (B,) int64
        - output: (B, H, W)
    """
    if feats.dim() != 4 or feats.shape[1] != classifier.dim:
        raise ValueError(f"expected features (B,{classifier.dim},H,W), got shape {tuple(feats.shape)}")
    if classes.shape != (feats.shape[0],):
        raise ValueError(
            f"expected one class per image ({feats.shape[0]},), got shape {tuple(classes.shape)}"
        )
    w = classifier.linear.weight[classes.long()].to(feats.dtype)  # (B, C)
    return torch.einsum("bc,bchw->bhw", w, feats)


def cam_mask(cam: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    """Boolean mask of the ``round(keep * H * W)`` highest CAM values of each map (ties broken by position).

    Shape:
        - cam: (B, H, W)
        - output: (B, H, W) bool, exactly ``round(keep * H * W)`` True per map
    """
    if cam.dim() != 3:
        raise ValueError(f"expected CAMs (B,H,W), got shape {tuple(cam.shape)}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"expected keep in [0, 1], got {keep}")
    flat = cam.reshape(cam.shape[0], -1)
    k = int(round(keep * flat.shape[1]))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        # stable sort: among equal values the earlier pixel wins, so the mask is deterministic
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask.reshape(cam.shape)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (replicate where the image is smaller than the kernel).

    Shape:
        - image: (B, C, H, W)
        - output: (B, C, H, W)
    """
    if image.dim() != 4:
        raise ValueError(f"expected images (B,C,H,W), got shape {tuple(image.shape)}")
    if sigma <= 0:
        return image.clone()
    if kernel_size is None:
        kernel_size = 2 * math.ceil(4 * sigma) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"expected an odd positive kernel_size, got {kernel_size}")
    r = kernel_size // 2
    x = torch.arange(-r, r + 1, dtype=image.dtype, device=image.device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    c = image.shape[1]
    mode = "reflect" if min(image.shape[-2:]) > r else "replicate"
    out = F.conv2d(F.pad(image, (r, r, 0, 0), mode=mode), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, r, r), mode=mode), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _default_sigma(image: torch.Tensor) -> float:
    return 10.0 * max(image.shape[-2:]) / 224.0


def cam_masked_image(
    image: torch.Tensor, cam: torch.Tensor, *, keep: float = 0.5, sigma: float | None = None
) -> torch.Tensor:
    """Keep the pixels of the top ``keep`` fraction of CAM values and Gaussian-blur the rest (section 6.10).

    A CAM smaller than the image is first bilinearly enlarged to it (the low-res CAM of 4.3).

    Shape:
        - image: (B, 3, H, W); cam: (B, h, w)
        - output: (B, 3, H, W)
    """
    if cam.dim() != 3 or cam.shape[0] != image.shape[0]:
        raise ValueError(f"expected CAMs (B,h,w) for {image.shape[0]} images, got shape {tuple(cam.shape)}")
    if tuple(cam.shape[-2:]) != tuple(image.shape[-2:]):
        cam = F.interpolate(cam[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    mask = cam_mask(cam, keep)[:, None].to(image.dtype)
    blurred = gaussian_blur(image, _default_sigma(image) if sigma is None else sigma)
    return mask * image + (1 - mask) * blurred


def average_drop(y: torch.Tensor, o: torch.Tensor) -> float:
    """Average Drop in percent: mean over images of max(0, Y - O) / Y * 100.

    Shape:
        - y, o: (N,) confidences of the true class on the original and the masked images
    """
    if y.shape != o.shape or y.dim() != 1 or y.numel() == 0:
        raise ValueError(
            f"expected two non-empty (N,) confidence vectors, got {tuple(y.shape)} and {tuple(o.shape)}"
        )
    y, o = y.detach().double(), o.detach().double()
    return float(((y - o).clamp_min(0) / y).mean() * 100)


def average_increase(y: torch.Tensor, o: torch.Tensor) -> float:
    """Average Increase in percent: share of images whose confidence rises after masking (Y < O), * 100.

    Shape:
        - y, o: (N,)
    """
    if y.shape != o.shape or y.dim() != 1 or y.numel() == 0:
        raise ValueError(
            f"expected two non-empty (N,) confidence vectors, got {tuple(y.shape)} and {tuple(o.shape)}"
        )
    return float((y.detach() < o.detach()).double().mean() * 100)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples]),
        "name": [s["name"] for s in samples],
    }


def train_classifier(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    n_classes: int,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    cache_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> MaxPoolClassifier:
    """Train the max-pool linear classifier (Adam, cross-entropy) on frozen backbone features.

    Max-pooled features are computed once (and cached to ``cache_path`` as safetensors when given), so
    epochs cost only the linear layer. A finished ``checkpoint_path`` is loaded instead of retraining.
    Everything runs on ``device`` (default: the backbone's); the classifier is returned there.
    """
    device = module_device(backbone) if device is None else torch.device(device)
    if checkpoint_path is not None and resume and Path(checkpoint_path).with_suffix(".safetensors").is_file():
        return MaxPoolClassifier.load(Path(checkpoint_path).with_suffix(".safetensors"), map_location=device)
    cache = Path(cache_path).with_suffix(".safetensors") if cache_path is not None else None
    if cache is not None and resume and cache.is_file():
        tensors, _ = load_checkpoint(cache, map_location=device)
        pooled, labels = tensors["pooled"], tensors["labels"]
    else:
        parts, labs = [], []
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=_collate,
            **loader_options(device, num_workers),
        )
        for batch in tqdm(loader, disable=not progress, desc="pool features"):
            batch = to_device(batch, device)
            with torch.no_grad():
                parts.append(backbone(batch["image"]).amax(dim=(2, 3)).float())
            labs.append(batch["label"])
        pooled, labels = torch.cat(parts), torch.cat(labs)
        if cache is not None:
            save_checkpoint(cache, {"pooled": pooled, "labels": labels}, {"n": int(labels.numel())})
    if int(labels.max()) >= n_classes:
        raise ValueError(f"expected labels below n_classes={n_classes}, got {int(labels.max())}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = MaxPoolClassifier(pooled.shape[1], n_classes)
    clf.to(device)
    optim = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in tqdm(range(epochs), disable=not progress, desc="train classifier"):
        perm = torch.randperm(labels.numel(), generator=gen).to(device)
        for s in range(0, labels.numel(), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(clf.linear(pooled[idx]), labels[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    clf.eval()
    if checkpoint_path is not None:
        clf.save(checkpoint_path, extra={"epochs": epochs, "n_train": int(labels.numel())})
    return clf


@torch.no_grad()
def select_correct(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    classifier: MaxPoolClassifier,
    dataset: Dataset,
    *,
    max_images: int | None = 2000,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Randomly ordered (seeded) validation indices whose label the classifier predicts, with their Y.

    Images are classified on ``device`` (default: the classifier's).

    Returns ``{"indices": [...], "confidence": [...]}``, at most ``max_images`` long.
    """
    device = module_device(classifier) if device is None else torch.device(device)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    indices: list[int] = []
    conf: list[float] = []
    bar = tqdm(total=max_images or len(order), disable=not progress, desc="select images")
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = _collate([dataset[i] for i in chunk])
        prob = classifier(backbone(batch["image"].to(device))).softmax(-1).cpu()  # one copy per batch
        for i, p, label in zip(chunk, prob, batch["label"].tolist()):
            if int(p.argmax()) == label and (max_images is None or len(indices) < max_images):
                indices.append(i)
                conf.append(float(p[label]))
                bar.update(1)
        if max_images is not None and len(indices) >= max_images:
            break
    bar.close()
    return {"indices": indices, "confidence": conf}


@torch.no_grad()
def evaluate_cam(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    classifier: MaxPoolClassifier,
    method: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    selection: dict[str, Any],
    *,
    keep: float = 0.5,
    sigma: float | None = None,
    batch_size: int = 8,
    state_path: str | os.PathLike | None = None,
    save_every: int = 10,
    progress: bool = True,
    desc: str = "cam",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Average Drop / Average Increase of CAMs from ``method``'s features on the selected images.

    ``selection`` comes from :func:`select_correct` (Y is reused from it). With ``state_path`` the masked
    confidences found so far are saved every ``save_every`` batches and a rerun continues from them.
    Images are moved to ``device`` (default: the classifier's), where ``method`` and ``backbone`` run.

    Returns:
        ``{"average_drop", "average_increase", "n_images"}`` (percent).
    """
    indices, y_all = selection["indices"], selection["confidence"]
    if not indices:
        raise ValueError(
            "no validation image is classified correctly, so A.D./A.I. are undefined; "
            "train the classifier longer or use more images"
        )
    device = module_device(classifier) if device is None else torch.device(device)
    state = Path(state_path).with_suffix(".json") if state_path is not None else None
    o_all: list[float] = list(read_json(state)["o"]) if state is not None and state.is_file() else []
    bar = tqdm(total=len(indices), initial=len(o_all), disable=not progress, desc=desc)
    n_batches = 0
    for s in range(len(o_all), len(indices), batch_size):
        batch = _collate([dataset[i] for i in indices[s : s + batch_size]])
        image, labels = batch["image"].to(device), batch["label"].to(device)
        cam = class_activation_map(method(image), classifier, labels)
        masked = cam_masked_image(image, cam, keep=keep, sigma=sigma)
        o = classifier(backbone(masked)).softmax(-1).gather(1, labels[:, None])[:, 0]
        o_all.extend(o.tolist())
        bar.update(len(labels))
        n_batches += 1
        if state is not None and n_batches % save_every == 0 and len(o_all) < len(indices):
            write_json(state, {"o": o_all})
    bar.close()
    if state is not None:
        state.unlink(missing_ok=True)
    y, o = torch.tensor(y_all, dtype=torch.float64), torch.tensor(o_all, dtype=torch.float64)
    return {
        "average_drop": average_drop(y, o),
        "average_increase": average_increase(y, o),
        "n_images": len(indices),
    }


def cam_table(results: dict[str, dict[str, Any]]) -> str:
    """The paper's Table 1 CAM columns as markdown."""
    rows = [
        [METHODS.get(m, m), format_number(r.get("average_drop")), format_number(r.get("average_increase"))]
        for m, r in results.items()
    ]
    return markdown_table(["Method", "A.D. ↓", "A.I. ↑"], rows)


def run_cam(
    backbone: str,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | str | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    image_size: int = 224,
    train_split: str = "train",
    val_split: str = "val",
    max_train_images: int | None = None,
    max_images: int = 2000,
    classifier_epochs: int = 10,
    classifier_lr: float = 1e-3,
    batch_size: int = 8,
    keep: float = 0.5,
    sigma: float | None = None,
    method_cfg: MethodConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """Everything behind ``featup cam``: classifier, image selection, A.D./A.I. per method; JSON per method.

    Everything runs on ``device`` (default :func:`~featup.eval.devices.default_device`: CUDA when available).

    Writes ``out_dir/classifier.safetensors``, ``out_dir/upsamplers/`` and ``out_dir/cam_results.json``.
    """
    names = parse_methods(methods)
    cfg = method_cfg or MethodConfig()
    out_dir = Path(out_dir)
    device = resolve_device(device)
    bb = load_backbone(backbone, weights=weights, pretrained=pretrained).to(device)
    train = ImageFolder(data, train_split, image_size, max_images=max_train_images)
    val = ImageFolder(data, val_split, image_size, classes=train.classes)
    run_config = {
        "backbone": backbone,
        "weights": str(weights) if weights else None,
        "pretrained": pretrained,
        "data": str(Path(data).resolve()),
        "image_size": image_size,
        "n_train": len(train),
        "n_val": len(val),
        "n_classes": len(train.classes),
        "max_images": max_images,
        "classifier_epochs": classifier_epochs,
        "keep": keep,
        "sigma": sigma,
        "seed": cfg.seed,
    }
    store = ResultStore(out_dir / "cam_results.json", run_config, resume=resume)
    clf = train_classifier(
        bb,
        train,
        len(train.classes),
        epochs=classifier_epochs,
        lr=classifier_lr,
        seed=cfg.seed,
        cache_path=out_dir / "pooled_train",
        progress=progress,
        checkpoint_path=out_dir / "classifier",
        resume=resume,
        device=device,
        num_workers=num_workers,
    )
    sel_path = out_dir / "selection.json"
    if resume and sel_path.is_file():
        selection = read_json(sel_path)
    else:
        selection = select_correct(
            bb, clf, val, max_images=max_images, seed=cfg.seed, progress=progress, device=device
        )
        write_json(sel_path, selection)
    log(f"{len(selection['indices'])} of {len(val)} validation images are classified correctly and scored")
    with torch.no_grad():
        feat_dim = int(bb(val[0]["image"][None].to(device)).shape[1])

    def evaluate(name: str, method: FeatureMethod, tag: str) -> dict[str, Any]:
        return evaluate_cam(
            bb,
            clf,
            method,
            val,
            selection,
            keep=keep,
            sigma=sigma,
            batch_size=batch_size,
            state_path=out_dir / "partial" / f"cam_{name}-{tag}",
            progress=progress,
            desc=f"cam {name}",
            device=device,
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
