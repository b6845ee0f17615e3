"""Confusion matrices and the segmentation scores derived from them (mIoU, mAcc, aAcc).

Scores are returned in percent, the unit the paper's Tables 1 and 2 print.
"""

from __future__ import annotations

import torch

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Count (target, prediction) pairs; pixels whose target is ``ignore_index`` are skipped.

    Args:
        pred: predicted class indices.
        target: ground-truth class indices, same shape as ``pred``.
        n_classes: number of classes K.
        ignore_index: target value that marks unlabeled pixels.

    Returns:
        int64 matrix M with M[t, p] = number of pixels of true class t predicted as p.

    Shape:
        - pred, target: any shape, equal
        - output: (K, K)
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"expected pred and target of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if n_classes < 1:
        raise ValueError(f"expected n_classes >= 1, got {n_classes}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        raise ValueError(
            f"expected targets in [0, {n_classes}) or {ignore_index}, got range "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n_classes):
        raise ValueError(
            f"expected predictions in [0, {n_classes}), got range [{int(pred.min())}, {int(pred.max())}]"
        )
    idx = target * n_classes + pred
    return torch.bincount(idx.cpu(), minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(conf: torch.Tensor) -> dict[str, float | list[float | None]]:
    """mIoU, mean class accuracy and all-pixel accuracy (percent) from a confusion matrix.

    Classes that never occur in the targets and are never predicted have no defined IoU and are left out
    of the means (the mmsegmentation convention); classes absent from the targets are left out of mAcc.

    Args:
        conf: confusion matrix with rows = true class, columns = predicted class.

    Returns:
        ``{"miou", "macc", "aacc", "iou"}``; ``iou`` lists the per-class IoU (None where undefined).

    Shape:
        - conf: (K, K)
    """
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square confusion matrix (K,K), got shape {tuple(conf.shape)}")
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    total = conf.sum()
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    defined = ~torch.isnan(iou)
    return {
        "miou": float(iou[defined].mean() * 100) if defined.any() else float("nan"),
        "macc": float(acc[~torch.isnan(acc)].mean() * 100) if (gt > 0).any() else float("nan"),
        "aacc": float(tp.sum() / total * 100) if total > 0 else float("nan"),
        "iou": [None if torch.isnan(v) else float(v * 100) for v in iou],
    }
