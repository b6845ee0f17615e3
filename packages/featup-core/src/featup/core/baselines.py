"""Baseline upsamplers behind the registry, all called as ``up(lr_feats, image, output_size=None)``.

- ``nearest``, ``bilinear``, ``bicubic``: plain resampling (unguided; ``image`` may be None).
- ``resize_conv``: learnable; bilinear 2x steps, each followed by a residual conv on [features, guidance].
- ``jbu_classic``: Kopf et al. (2007) joint bilateral upsampling with fixed Gaussian range (RGB distance) and
  spatial kernels, no training, applied as 2x steps on :func:`featup.kernels.adaptive_conv`.
- ``bicubic_bp``, ``jbu_classic_bp``: those followed by the back-projection onto the input features
  (:mod:`featup.core.consistency`), the starts of the implicit and the JBU upsampler.
- ``carafe``: CARAFE (Wang et al., 2019), content-aware reassembly with kernels predicted from the features.
- ``sapa``: SAPA (Lu et al., 2022), similarity-aware point affiliation between guidance queries and
  low-resolution feature keys.

CARAFE and SAPA are written in plain PyTorch (no mmcv, no custom ops): their reassembly loops over the taps
of the low-resolution neighborhood of each output pixel, so no K*K-times-larger tensor is built. All the
multi-step baselines use the same stage plan as :class:`featup.core.JBUStack` (2x steps, exact last size).
Every constructor accepts ``feat_dim`` so ``create_upsampler(name, feat_dim=C)`` works for every name; the
learnable ones require it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointMixin
from featup.core.consistency import back_project
from featup.core.jbu import (
    _taps,
    apply_kernel,
    classic_kernel,
    pad2d,
    pool_guidance,
    resize,
    stage_sizes,
)
from featup.core.registry import register_upsampler

__all__ = [
    "BackProjected",
    "BicubicUpsampler",
    "BilinearUpsampler",
    "CARAFEUpsampler",
    "ClassicJBU",
    "NearestUpsampler",
    "ResizeConvUpsampler",
    "SAPAUpsampler",
    "lr_neighborhood_sum",
]


def _require_dim(name: str, feat_dim: int | None) -> int:
    if not isinstance(feat_dim, int) or feat_dim < 1:
        raise ValueError(f"{name} is learnable and needs feat_dim (a positive int), got {feat_dim!r}")
    return feat_dim


def _check_channels(up: nn.Module, lr_feats: torch.Tensor, feat_dim: int) -> None:
    if lr_feats.shape[1] != feat_dim:
        raise ValueError(
            f"{type(up).__name__} was built for {feat_dim} channels: expected lr_feats (B,{feat_dim},h,w), "
            f"got {tuple(lr_feats.shape)}"
        )


def lr_neighborhood_sum(weights: torch.Tensor, x: torch.Tensor, radius: int) -> torch.Tensor:
    """Reassemble: each output pixel mixes the K x K low-res neighborhood around its nearest low-res cell.

    ``out[b, c, l] = sum_p weights[b, p, l] * x_pad[b, c, src(l) + offset_p]`` with ``src`` the nearest-exact
    source cell of output pixel ``l``. Borders are replicate-padded (CARAFE and SAPA zero-pad, which shrinks
    features at the image border; replicate keeps them in the feature space).

    Shape:
        - weights: (B, K * K, H, W), tap index ``i * K + j``
        - x: (B, C, h, w)
        - output: (B, C, H, W)
    """
    size = weights.shape[-2:]
    h, w = x.shape[-2:]
    xp = pad2d(x, radius, "replicate")
    out = None
    for p, (i, j) in enumerate(_taps(radius)):
        term = weights[:, p : p + 1] * resize(xp[:, :, i : i + h, j : j + w], size, "nearest-exact")
        out = term if out is None else out + term
    assert out is not None
    return out


class _Resample(Upsampler):
    guided = False
    mode = "bilinear"

    def __init__(self, feat_dim: int | None = None) -> None:
        super().__init__()
        self.feat_dim = feat_dim  # accepted for a uniform factory call; resampling has no parameters

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        return resize(lr_feats, size, self.mode)


@register_upsampler("nearest")
class NearestUpsampler(_Resample):
    """Nearest-neighbor resampling (``nearest-exact``: pixel centers aligned). Unguided.

    Shape:
        - lr_feats: (B, C, h, w); image: optional (B, 3, H, W)
        - output: (B, C, H', W'), output_size or the image size
    """

    mode = "nearest-exact"


@register_upsampler("bilinear")
class BilinearUpsampler(_Resample):
    """Bilinear resampling (align_corners=False, anti-aliased when shrinking). Unguided.

    Shape:
        - lr_feats: (B, C, h, w); image: optional (B, 3, H, W)
        - output: (B, C, H', W'), output_size or the image size
    """

    mode = "bilinear"


@register_upsampler("bicubic")
class BicubicUpsampler(_Resample):
    """Bicubic resampling (align_corners=False, anti-aliased when shrinking). Unguided.

    Shape:
        - lr_feats: (B, C, h, w); image: optional (B, 3, H, W)
        - output: (B, C, H', W'), output_size or the image size
    """

    mode = "bicubic"


@register_upsampler("jbu_classic")
class ClassicJBU(Upsampler):
    """Kopf et al.'s joint bilateral upsampling: fixed Gaussian range kernel on RGB, fixed spatial Gaussian.

    Per 2x step: ``k = exp(-|g_c - g_n|^2 / (2 sigma_range^2)) * exp(-|d|^2 / (2 sigma_spatial^2))``
    normalized over the K x K window (d in [-1, 1] window coordinates), applied with the adaptive convolution
    to the features resampled by ``resample`` (bicubic, as the JBU stack). No parameters.

    Args:
        feat_dim: ignored (uniform factory call).
        radius: window radius (K = 2 * radius + 1).
        sigma_spatial: spatial width in normalized window coordinates.
        sigma_range: range width in RGB units ([0, 1] images).
        resample: how features are brought to each step's grid ("nearest-exact", "bilinear" or "bicubic").

    Shape:
        - lr_feats: (B, C, h, w); image: (B, 3, H, W)
        - output: (B, C, H', W')
    """

    def __init__(
        self,
        feat_dim: int | None = None,
        *,
        radius: int = 3,
        sigma_spatial: float = 0.5,
        sigma_range: float = 0.1,
        resample: str = "bicubic",
    ) -> None:
        super().__init__()
        if sigma_spatial <= 0 or sigma_range <= 0:
            raise ValueError(f"expected positive sigmas, got {sigma_spatial=}, {sigma_range=}")
        self.feat_dim = feat_dim
        self.radius = radius
        self.sigma_spatial = float(sigma_spatial)
        self.sigma_range = float(sigma_range)
        self.resample = resample

    def config(self) -> dict[str, Any]:
        return {
            "feat_dim": self.feat_dim,
            "radius": self.radius,
            "sigma_spatial": self.sigma_spatial,
            "sigma_range": self.sigma_range,
            "resample": self.resample,
        }

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """Normalized bilateral kernels (B, K*K, H, W) for this guidance."""
        return classic_kernel(guidance, self.radius, self.sigma_spatial, self.sigma_range)

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        assert image is not None
        x = lr_feats
        guidance = image.to(lr_feats.dtype)
        for stage_size in stage_sizes(lr_feats.shape[-2:], size):
            kernel = self.kernel(pool_guidance(guidance, stage_size))
            x = apply_kernel(x, kernel, self.radius, resize_mode=self.resample)
        return x


class BackProjected(Upsampler):
    """A fixed upsampler followed by :func:`featup.core.consistency.back_project` onto its input features.

    The baselines the default JBU (``jbu_classic_bp`` at initialisation) and the implicit upsampler
    (``bicubic_bp`` at initialisation) start from: they show what the back-projection alone does.

    Args:
        feat_dim: ignored (uniform factory call).
        base: a registered parameter-free upsampler (``"bicubic"``, ``"jbu_classic"``, ...).

    Shape:
        - lr_feats: (B, C, h, w); image: (B, 3, H, W) (optional if ``base`` is unguided)
        - output: (B, C, H', W'); back-projected when H' >= h and W' >= w
    """

    def __init__(self, feat_dim: int | None = None, *, base: str = "bicubic") -> None:
        super().__init__()
        from featup.core.registry import create_upsampler

        self.base_name = base
        self.base = create_upsampler(base)
        if any(True for _ in self.base.parameters()):
            raise ValueError(f"expected a parameter-free base upsampler, got {base!r}")
        self.guided = bool(getattr(self.base, "guided", True))
        self.feat_dim = feat_dim

    def config(self) -> dict[str, Any]:
        return {"feat_dim": self.feat_dim, "base": self.base_name}

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        out = self.base(lr_feats, image, size)
        if size[0] < lr_feats.shape[-2] or size[1] < lr_feats.shape[-1]:
            return out
        return back_project(out, lr_feats, inplace=not (torch.is_grad_enabled() and out.requires_grad))


@register_upsampler("bicubic_bp")
def bicubic_bp(feat_dim: int | None = None) -> BackProjected:
    """Bicubic, back-projected onto the input features (the fresh implicit upsampler)."""
    return BackProjected(feat_dim, base="bicubic")


@register_upsampler("jbu_classic_bp")
def jbu_classic_bp(feat_dim: int | None = None) -> BackProjected:
    """Kopf's joint bilateral upsampling, back-projected onto the input features (the fresh ``JBUStack()``)."""
    return BackProjected(feat_dim, base="jbu_classic")


@register_upsampler("resize_conv")
class ResizeConvUpsampler(Upsampler, CheckpointMixin):
    """Learnable resize-conv: per 2x step, bilinear resize then ``x + act(conv([x, guidance]))``.

    ``act`` is ReLU except on the last step. Step ``k`` uses conv ``min(k, n_stages - 1)``.

    Shape:
        - lr_feats: (B, feat_dim, h, w); image: (B, 3, H, W)
        - output: (B, feat_dim, H', W')
    """

    def __init__(self, feat_dim: int | None = None, *, kernel_size: int = 1, n_stages: int = 4) -> None:
        super().__init__()
        dim = _require_dim("resize_conv", feat_dim)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"expected an odd positive kernel_size, got {kernel_size}")
        self.feat_dim, self.kernel_size, self.n_stages = dim, kernel_size, n_stages
        self.convs = nn.ModuleList(
            nn.Conv2d(dim + 3, dim, kernel_size, padding=kernel_size // 2) for _ in range(n_stages)
        )

    def config(self) -> dict[str, Any]:
        return {"feat_dim": self.feat_dim, "kernel_size": self.kernel_size, "n_stages": self.n_stages}

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        assert image is not None
        _check_channels(self, lr_feats, self.feat_dim)
        x = lr_feats
        sizes = stage_sizes(lr_feats.shape[-2:], size)
        for k, stage_size in enumerate(sizes):
            x = resize(x, stage_size, "bilinear")
            guidance = pool_guidance(image.to(x.dtype), stage_size)
            delta = self.convs[min(k, self.n_stages - 1)](torch.cat([x, guidance], dim=1))
            x = x + (delta if k == len(sizes) - 1 else F.relu(delta))
        return x


class CARAFEStage(nn.Module):
    """One CARAFE step: compress, encode K_up^2 kernels per output pixel, softmax, reassemble.

    Shape:
        - x: (B, dim, h, w); size: (H, W) with H, W <= 2h, 2w (or any size: kernels are resampled)
        - output: (B, dim, H, W)
    """

    def __init__(
        self, dim: int, *, compressed_dim: int = 64, enc_kernel: int = 3, up_kernel: int = 3
    ) -> None:
        super().__init__()
        self.up_radius = up_kernel // 2
        self.compress = nn.Conv2d(dim, compressed_dim, 1)
        self.encode = nn.Conv2d(compressed_dim, 4 * up_kernel**2, enc_kernel, padding=enc_kernel // 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = F.pixel_shuffle(self.encode(self.compress(x)), 2)  # kernels for the 2x grid
        logits = resize(logits, size, "nearest-exact")  # exact size: each pixel takes its 2x-grid kernel
        return lr_neighborhood_sum(torch.softmax(logits, dim=1), x, self.up_radius)


@register_upsampler("carafe")
class CARAFEUpsampler(Upsampler, CheckpointMixin):
    """CARAFE (content-aware reassembly of features) in 2x steps; unguided, learnable.

    Shape:
        - lr_feats: (B, feat_dim, h, w); image: optional (B, 3, H, W)
        - output: (B, feat_dim, H', W')
    """

    guided = False

    def __init__(
        self, feat_dim: int | None = None, *, compressed_dim: int = 64, up_kernel: int = 3, n_stages: int = 4
    ) -> None:
        super().__init__()
        dim = _require_dim("carafe", feat_dim)
        self.feat_dim, self.compressed_dim, self.up_kernel, self.n_stages = (
            dim,
            compressed_dim,
            up_kernel,
            n_stages,
        )
        self.stages = nn.ModuleList(
            CARAFEStage(dim, compressed_dim=compressed_dim, up_kernel=up_kernel) for _ in range(n_stages)
        )

    def config(self) -> dict[str, Any]:
        return {
            "feat_dim": self.feat_dim,
            "compressed_dim": self.compressed_dim,
            "up_kernel": self.up_kernel,
            "n_stages": self.n_stages,
        }

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        _check_channels(self, lr_feats, self.feat_dim)
        x = lr_feats
        for k, stage_size in enumerate(stage_sizes(lr_feats.shape[-2:], size)):
            x = self.stages[min(k, self.n_stages - 1)](x, stage_size)
        return x


class SAPAStage(nn.Module):
    """One SAPA step: softmax over the low-res K x K neighborhood of <q(guidance_hr), k(features_lr)>.

    Shape:
        - x: (B, dim, h, w); guidance: (B, 3, H, W)
        - output: (B, dim, H, W)
    """

    def __init__(self, dim: int, guidance_dim: int = 3, *, embed_dim: int = 64, up_kernel: int = 5) -> None:
        super().__init__()
        self.up_radius = up_kernel // 2
        self.norm_y = nn.LayerNorm(guidance_dim)
        self.norm_x = nn.LayerNorm(dim)
        self.q = nn.Linear(guidance_dim, embed_dim)
        self.k = nn.Linear(dim, embed_dim)
        for lin in (self.q, self.k):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        size = guidance.shape[-2:]
        h, w = x.shape[-2:]
        q = self.q(self.norm_y(guidance.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        k = pad2d(self.k(self.norm_x(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2), self.up_radius, "replicate")
        taps = _taps(self.up_radius)
        logits = torch.stack(
            [(q * resize(k[:, :, i : i + h, j : j + w], size, "nearest-exact")).sum(1) for i, j in taps],
            dim=1,
        )
        return lr_neighborhood_sum(torch.softmax(logits, dim=1), x, self.up_radius)


@register_upsampler("sapa")
class SAPAUpsampler(Upsampler, CheckpointMixin):
    """SAPA (similarity-aware point affiliation) in 2x steps, guided by the pooled image; learnable.

    Shape:
        - lr_feats: (B, feat_dim, h, w); image: (B, 3, H, W)
        - output: (B, feat_dim, H', W')
    """

    def __init__(
        self, feat_dim: int | None = None, *, embed_dim: int = 64, up_kernel: int = 5, n_stages: int = 4
    ) -> None:
        super().__init__()
        dim = _require_dim("sapa", feat_dim)
        self.feat_dim, self.embed_dim, self.up_kernel, self.n_stages = dim, embed_dim, up_kernel, n_stages
        self.stages = nn.ModuleList(
            SAPAStage(dim, embed_dim=embed_dim, up_kernel=up_kernel) for _ in range(n_stages)
        )

    def config(self) -> dict[str, Any]:
        return {
            "feat_dim": self.feat_dim,
            "embed_dim": self.embed_dim,
            "up_kernel": self.up_kernel,
            "n_stages": self.n_stages,
        }

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        assert image is not None
        _check_channels(self, lr_feats, self.feat_dim)
        x = lr_feats
        guidance = image.to(lr_feats.dtype)
        for k, stage_size in enumerate(stage_sizes(lr_feats.shape[-2:], size)):
            x = self.stages[min(k, self.n_stages - 1)](x, pool_guidance(guidance, stage_size))
        return x
