"""Quality metrics for upsampled features: against ground-truth features, and through a frozen linear probe.

- :func:`feature_cosine`, :func:`feature_mse`: agreement with ground-truth high-resolution features.
- :class:`LinearProbe`: the paper's frozen-probe protocol (Section 4.2): a 1x1 linear classifier trained on
  *low-resolution* features, then frozen and applied to every upsampler's output at image resolution. It only
  scores well on upsampled features that stay in the backbone's feature space.
- :func:`confusion_matrix`, :func:`miou`, :func:`pixel_accuracy`, :func:`boundary_fscore`: segmentation
scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LinearProbe",
    "boundary_fscore",
    "boundary_map",
    "confusion_matrix",
    "feature_cosine",
    "feature_mse",
    "miou",
    "pixel_accuracy",
    "segmentation_scores",
]


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"expected {what} as torch.Tensors, got {type(pred).__name__} and {type(target).__name__}"
        )
    if pred.shape != target.shape:
        raise ValueError(f"expected {what} of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def feature_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over pixels of the cosine similarity between predicted and target feature vectors.

    Shape:
        - pred, target: (B, C, H, W)
    """
    _check_pair(pred, target, "features")
    return float(F.cosine_similarity(pred.double(), target.double(), dim=1, eps=1e-12).mean())


def feature_mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over every element.

    Shape:
        - pred, target: (B, C, H, W)
    """
    _check_pair(pred, target, "features")
    return float((pred.double() - target.double()).pow(2).mean())


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts ``conf[t, p]`` of pixels with true class t predicted as p; targets outside [0, K) are ignored.

    Shape:
        - pred, target: any equal shape of integer labels; output: (K, K) int64
    """
    _check_pair(pred, target, "label maps")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = (t >= 0) & (t < n_classes)
    t, p = t[keep], p[keep]
    if ((p < 0) | (p >= n_classes)).any():
        raise ValueError(f"expected predicted labels in [0, {n_classes}), got values outside")
    return torch.bincount(t * n_classes + p, minlength=n_classes**2).reshape(n_classes, n_classes)


def miou(conf: torch.Tensor) -> float:
    """Mean intersection over union over the classes present in the target or the prediction.

    Shape:
        - conf: (K, K) confusion matrix (rows true, columns predicted)
    """
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    if not present.any():
        raise ValueError("expected a non-empty confusion matrix, got one with no pixels")
    return float((inter[present] / union[present]).mean())


def pixel_accuracy(conf: torch.Tensor) -> float:
    """Fraction of pixels labelled correctly.

    Shape:
        - conf: (K, K)
    """
    total = conf.sum()
    if total == 0:
        raise ValueError("expected a non-empty confusion matrix, got one with no pixels")
    return float(conf.diag().sum().double() / total.double())


def boundary_map(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose right or lower neighbour has another label (a one-pixel-wide boundary).

    Shape:
        - labels: (B, H, W) integer; output: (B, H, W) bool
    """
    if labels.dim() != 3:
        raise ValueError(f"expected label maps (B,H,W), got shape {tuple(labels.shape)}")
    b = torch.zeros_like(labels, dtype=torch.bool)
    b[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    b[:, :-1, :] |= labels[:, :-1, :] != labels[:, 1:, :]
    return b


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return mask
    k = 2 * radius + 1
    # a disk rather than a square, so the tolerance is a Euclidean distance as in the BSDS/DAVIS measure
    r = torch.arange(k, device=mask.device) - radius  # built where the mask lives (CUDA maps too)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    disk = ((yy**2 + xx**2) <= radius**2).float()[None, None]
    out = F.conv2d(mask.float()[:, None], disk, padding=radius)
    return out[:, 0] > 0


def boundary_fscore(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2) -> float:
    """Boundary F-score: precision and recall of boundary pixels matched within ``tolerance`` pixels.

    Precision is the fraction of predicted boundary pixels within ``tolerance`` (Euclidean) of a true
    boundary,
    recall the fraction of true boundary pixels within ``tolerance`` of a predicted one; counts are summed
    over
    the batch. Both maps without boundaries score 1; exactly one without boundaries scores 0.

    Shape:
        - pred, target: (B, H, W) integer label maps
    """
    _check_pair(pred, target, "label maps")
    if tolerance < 0:
        raise ValueError(f"expected tolerance >= 0, got {tolerance}")
    pb, tb = boundary_map(pred), boundary_map(target)
    n_pred, n_true = int(pb.sum()), int(tb.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    precision = float((pb & _dilate(tb, tolerance)).sum()) / n_pred
    recall = float((tb & _dilate(pb, tolerance)).sum()) / n_true
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, n_classes: int, tolerance: int = 2) -> dict:
    """``{"miou", "accuracy", "boundary_f"}`` of predicted label maps against true ones.

    Shape:
        - pred, target: (B, H, W) integer label maps
    """
    conf = confusion_matrix(pred, target, n_classes)
    return {
        "miou": miou(conf),
        "accuracy": pixel_accuracy(conf),
        "boundary_f": boundary_fscore(pred, target, tolerance),
    }


class LinearProbe(nn.Module):
    """A 1x1 linear classifier on features, trained on low-res features and then frozen.

    The low-resolution targets are the class *fractions* of the pixels each feature cell covers (area-pooled
    one-hot labels), trained with soft cross-entropy: the probe learns p(class | low-res feature), which is
    the
    paper's protocol without throwing away the label detail inside a cell.

    Args:
        feat_dim: feature channels C.
        n_classes: number of classes K.

    Shape:
        - forward: (B, C, H, W) -> logits (B, K, H, W)
    """

    def __init__(self, feat_dim: int, n_classes: int) -> None:
        super().__init__()
        self.feat_dim, self.n_classes = int(feat_dim), int(n_classes)
        self.linear = nn.Conv2d(self.feat_dim, self.n_classes, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"expected features (B,{self.feat_dim},H,W), got shape {tuple(feats.shape)}")
        return self.linear(feats)

    @torch.no_grad()
    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Argmax labels. Shape: (B, C, H, W) -> (B, H, W) int64."""
        return self(feats).argmax(1)

    def fit(
        self,
        lr_feats: torch.Tensor,
        labels: torch.Tensor,
        *,
        steps: int = 300,
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> LinearProbe:
        """Train on low-res features against area-pooled labels; returns ``self`` frozen, in eval mode.

        Labels outside ``[0, K)`` (255, -1, ...) are ignored, as :func:`confusion_matrix` ignores them: a
        cell's target is the class mix of its *valid* pixels, and each cell's loss is weighted by its
        fraction of valid pixels (cells without any count nothing). Training runs on the probe's device.

        Shape:
            - lr_feats: (N, C, h, w); labels: (N, H, W) integer with H >= h, W >= w

        Raises:
            ValueError: shapes that do not match, or labels without a single valid pixel.
        """
        if lr_feats.dim() != 4 or labels.dim() != 3 or lr_feats.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected lr_feats (N,C,h,w) and labels (N,H,W) with one N, got {tuple(lr_feats.shape)} "
                f"and {tuple(labels.shape)}"
            )
        device = self.linear.weight.device
        h, w = lr_feats.shape[-2:]
        labels = labels.to(device).long()
        valid = (labels >= 0) & (labels < self.n_classes)
        if not bool(valid.any()):
            raise ValueError(f"expected labels with at least one pixel in [0, {self.n_classes}), got none")
        onehot = F.one_hot(labels.where(valid, 0), self.n_classes).movedim(-1, 1).float()
        onehot = onehot * valid[:, None]
        # pooled[k] = fraction of the cell's pixels that are valid and of class k; weight = valid fraction
        pooled = F.interpolate(onehot, size=(h, w), mode="area")
        weight = pooled.sum(1)
        target = pooled / weight.clamp_min(1e-12)[:, None]
        x = lr_feats.detach().to(device).float()
        g = torch.Generator().manual_seed(seed)  # a CPU generator: the same initial weights on any device
        with torch.no_grad():
            w0 = torch.empty(self.linear.weight.shape).normal_(0, 0.01, generator=g)
            self.linear.weight.copy_(w0)
            self.linear.bias.zero_()
        self.requires_grad_(True)
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        total = weight.sum()
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                per_cell = -(target * F.log_softmax(self(x), 1)).sum(1)
                loss = (per_cell * weight).sum() / total
                loss.backward()
                opt.step()
        self.requires_grad_(False)
        return self.eval()
