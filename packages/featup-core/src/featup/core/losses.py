"""FeatUp's training losses: the multi-view Gaussian likelihood (eq. 1), the TV prior (eq. 8), JL projections.

Paper conventions made explicit here:

- eq. 1 uses the squared error *averaged* over channels. Against the paper's channel sum this only
  reparametrises the learned scale (``s_sum = sqrt(C) s_mean``), and keeps the loss comparable across
  projection dimensions.
- eq. 8 is averaged over pixels and batch (the original code's normalisation, which ``lambda_tv = 0.05``
  assumes), not summed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MIN_SCALE", "UncertaintyHead", "project", "random_projection", "reconstruction_loss", "tv_loss"]


def _check4d(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor (B,C,H,W), got {type(x).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"expected {name} (B,C,H,W) non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point {name}, got dtype {x.dtype}")
    return x


class UncertaintyHead(nn.Module):
    """Per-pixel log-scale ``log s`` of eq. 1 from the observed (target) features: a linear 1x1 conv.

    Initialised to zero, so training starts from ``s = 1`` (plain half mean squared error).

    Args:
        dim: channels of the target features (after any projection).

    Shape:
        - target: (B, dim, h, w)
        - output: (B, 1, h, w) log-scale
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"expected dim >= 1, got {dim}")
        self.dim = int(dim)
        self.conv = nn.Conv2d(self.dim, 1, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        _check4d(target, "target")
        if target.shape[1] != self.dim:
            raise ValueError(
                f"expected target with {self.dim} channels (B,{self.dim},h,w), got {tuple(target.shape)}"
            )
        return self.conv(target)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


#: the smallest per-pixel scale eq. 1 may use (the original code's ``clamp_min(1e-4)``)
MIN_SCALE = 1e-4


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    log_scale: torch.Tensor | None = None,
    *,
    min_scale: float | None = MIN_SCALE,
) -> torch.Tensor:
    """Gaussian negative log-likelihood with a per-pixel scale (paper eq. 1).

    ``mean_{b,i,j} [ mean_c (pred - target)^2 / (2 s^2) + log s ]`` with ``s = max(exp(log_scale),
    min_scale)``; without a ``log_scale`` it is ``s = 1``, i.e. half the mean squared error. Averaging this
    over the jittered views gives eq. 1's ``1/|T| sum_t``. The floor keeps the likelihood bounded below (an
    unfloored scale can run to zero, where the loss goes to minus infinity and its gradient grows as 1/s^2).

    Args:
        pred: downsampled, jittered high-resolution features.
        target: backbone features of the jittered image.
        log_scale: per-pixel ``log s`` (e.g. from :class:`UncertaintyHead`), or None.
        min_scale: floor of ``s`` (> 0; below it the scale gets no gradient), or None for no floor.

    Returns:
        Scalar loss.

    Shape:
        - pred, target: (B, C, h, w)
        - log_scale: (B, 1, h, w) or None
    """
    _check4d(pred, "pred")
    _check4d(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"expected pred and target of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    err = (pred - target).square().mean(1, keepdim=True)
    if log_scale is None:
        return 0.5 * err.mean()
    _check4d(log_scale, "log_scale")
    expected = (pred.shape[0], 1, pred.shape[2], pred.shape[3])
    if tuple(log_scale.shape) != expected:
        raise ValueError(f"expected log_scale of shape {expected}, got {tuple(log_scale.shape)}")
    if min_scale is not None:
        if not (isinstance(min_scale, (int, float)) and math.isfinite(min_scale) and min_scale > 0):
            raise ValueError(f"expected min_scale as a positive finite number or None, got {min_scale!r}")
        log_scale = log_scale.clamp_min(math.log(min_scale))
    return (0.5 * err * torch.exp(-2.0 * log_scale) + log_scale).mean()


def tv_loss(hr: torch.Tensor) -> torch.Tensor:
    """Total-variation prior on feature magnitudes (paper eq. 8), averaged over pixels and batch.

    ``sum_{i,j} (|F[i,j]| - |F[i-1,j]|)^2 + (|F[i,j]| - |F[i,j-1]|)^2`` divided by ``B * H * W``, with
    ``|.|`` the L2 norm over channels.

    Shape:
        - hr: (B, C, H, W)
        - output: scalar
    """
    _check4d(hr, "hr")
    mag = torch.linalg.vector_norm(hr, dim=1)  # (B, H, W)
    dy = (mag[:, 1:, :] - mag[:, :-1, :]).square().sum()
    dx = (mag[:, :, 1:] - mag[:, :, :-1]).square().sum()
    return (dy + dx) / mag.numel()


def random_projection(
    dim_in: int,
    dim_out: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A Johnson-Lindenstrauss projection: i.i.d. N(0, 1/dim_out) entries (squared norms kept on average).

    Drawn on the generator's device (CPU for a default generator) and then moved, so a seeded CPU generator
    gives the same matrix on every device.

    Shape:
        - output: (dim_in, dim_out)
    """
    if int(dim_in) < 1 or int(dim_out) < 1:
        raise ValueError(f"expected dim_in, dim_out >= 1, got {dim_in}, {dim_out}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    mat = torch.randn(int(dim_in), int(dim_out), generator=generator, device=gen_device, dtype=torch.float32)
    mat = mat / math.sqrt(dim_out)
    return mat.to(device=device, dtype=dtype or torch.get_default_dtype())


def project(feats: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Project the channels of a feature map: ``out[b,d,h,w] = sum_c feats[b,c,h,w] matrix[c,d]``.

    Shape:
        - feats: (B, C, H, W)
        - matrix: (C, D)
        - output: (B, D, H, W)
    """
    _check4d(feats, "feats")
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"expected matrix (C,D), got {got}")
    if matrix.shape[0] != feats.shape[1]:
        raise ValueError(
            f"expected matrix with {feats.shape[1]} rows to match feats (B,{feats.shape[1]},H,W), "
            f"got {tuple(matrix.shape)}"
        )
    return torch.einsum("bchw,cd->bdhw", feats, matrix.to(feats.dtype))
