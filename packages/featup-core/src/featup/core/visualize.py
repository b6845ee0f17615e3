"""Figures as the paper draws them: feature maps as RGB through PCA, uncertainty and salience heat maps.

``pca_rgb`` fits the top three principal components on the low-resolution features only and applies that same
projection and color scaling to every high-resolution map, so colors mean the same thing across all of them
and an upsampler that leaves the feature space shows up as a color shift. Matplotlib is needed only for the
colormaps of :func:`colorize` (install the ``viz`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featup.core._checks import check_features

__all__ = ["colorize", "fit_pca_rgb", "pca_rgb", "salience_rgb", "uncertainty_rgb"]


def _pixels(feats: torch.Tensor) -> torch.Tensor:
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def fit_pca_rgb(
    lr_feats: torch.Tensor, *, quantile: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the 3-component PCA and its color scaling on (all pixels of all images of) ``lr_feats``.

    Component signs are fixed (largest-magnitude loading positive) so colors are deterministic. With fewer
    than 3 channels or informative directions, the missing components are zero (their color is mid-gray).

    Returns:
        (mean (C,), components (3, C), low (3,), high (3,)) with
        ``rgb = clamp(((x - mean) @ components.T - low) / (high - low), 0, 1)``, where low / high are the
        ``quantile`` and ``1 - quantile`` quantiles of the low-res projections.
    """
    check_features(lr_feats, "lr_feats")
    x = _pixels(lr_feats.detach().double())
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs.flip(-1).T[:3]  # (<=3, C), largest variance first
    comps = comps * torch.where(comps.gather(1, comps.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0).to(
        comps.dtype
    )
    if comps.shape[0] < 3:
        comps = torch.cat([comps, comps.new_zeros(3 - comps.shape[0], comps.shape[1])])
    proj = xc @ comps.T
    low = torch.quantile(proj, quantile, dim=0)
    high = torch.quantile(proj, 1 - quantile, dim=0)
    dtype = lr_feats.dtype
    return mean.to(dtype), comps.to(dtype), low.to(dtype), high.to(dtype)


def pca_rgb(lr_feats: torch.Tensor, *hr_feats: torch.Tensor, quantile: float = 0.01) -> list[torch.Tensor]:
    """Feature maps as RGB: PCA fitted on ``lr_feats``, applied to ``lr_feats`` and every ``hr_feats`` map.

    Args:
        lr_feats: the low-resolution features the projection is fitted on.
        *hr_feats: any number of maps in the same feature space (any sizes, same channels).
        quantile: robust color range: the low-res projections' ``quantile`` .. ``1 - quantile`` map to 0 .. 1.

    Returns:
        ``[rgb(lr_feats), rgb(hr_feats[0]), ...]``, each (B, 3, H, W) in [0, 1] (float32).

    Shape:
        - lr_feats: (B, C, h, w); hr_feats[i]: (B_i, C, H_i, W_i)
        - output[i]: (B_i, 3, H_i, W_i)
    """
    mean, comps, low, high = fit_pca_rgb(lr_feats, quantile=quantile)
    span = (high - low).clamp_min(1e-12)
    out = []
    for feats in (lr_feats, *hr_feats):
        check_features(feats, "hr_feats")
        if feats.shape[1] != lr_feats.shape[1]:
            raise ValueError(
                f"expected hr_feats with {lr_feats.shape[1]} channels like lr_feats, got {tuple(feats.shape)}"
            )
        f = feats.detach().to(mean.dtype)
        proj = torch.einsum("bchw,kc->bkhw", f - mean.view(1, -1, 1, 1), comps)
        rgb = ((proj - low.view(1, 3, 1, 1)) / span.view(1, 3, 1, 1)).clamp(0, 1)
        out.append(rgb.float())
    return out


def colorize(
    maps: torch.Tensor,
    cmap: str = "inferno",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Single-channel maps to RGB through a matplotlib colormap, each image scaled to its own range.

    Args:
        maps: (B, 1, h, w) or (B, h, w) values.
        cmap: matplotlib colormap name.
        vmin, vmax: fixed range instead of each image's min / max.
        size: optional (H, W) to resize to (bilinear) before coloring.

    Shape:
        - output: (B, 3, H, W) float32 in [0, 1]
    """
    import matplotlib

    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"expected maps (B,1,h,w) or (B,h,w), got {tuple(maps.shape)}")
    m = maps.detach().float().cpu()
    if size is not None:
        m = F.interpolate(m, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    flat = m.flatten(1)
    lo = flat.min(1).values if vmin is None else torch.full((m.shape[0],), float(vmin))
    hi = flat.max(1).values if vmax is None else torch.full((m.shape[0],), float(vmax))
    scaled = ((m - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(0, 1)
    lut = torch.tensor(
        matplotlib.colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32
    )
    idx = (scaled[:, 0] * 255).round().long()
    return lut[idx].permute(0, 3, 1, 2).contiguous()


def uncertainty_rgb(
    log_scale: torch.Tensor, size: Sequence[int] | None = None, cmap: str = "gray"
) -> torch.Tensor:
    """The predicted uncertainty ``s = exp(log_scale)`` of eq. 1 as an image; brighter is more uncertain.

    Shape:
        - log_scale: (B, 1, h, w) (as returned by the uncertainty head)
        - output: (B, 3, H, W) in [0, 1], (H, W) = size or (h, w)
    """
    return colorize(log_scale.exp(), cmap, size=size)


def salience_rgb(
    salience: torch.Tensor, size: Sequence[int] | None = None, cmap: str = "viridis"
) -> torch.Tensor:
    """The attention downsampler's salience map (paper Fig. 13) as an image.

    Shape:
        - salience: (B, 1, H, W)
        - output: (B, 3, H', W') in [0, 1], (H', W') = size or (H, W)
    """
    return colorize(salience, cmap, size=size)
