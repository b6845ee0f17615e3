"""FeatUp's JBU upsampler: a stack of learned joint bilateral upsamplers (paper eq. 3-6).

Each stage resamples the features to its own size, builds one K x K kernel per output pixel from the guidance
image alone and applies it with the fused :func:`featup.kernels.adaptive_conv` (the neighbourhood
similarities too, so no (C * K * K, H, W) patch tensor is materialised). Stages double the resolution until
the requested size; the last lands on it exactly, so any ratio and odd or non-square sizes work. The kernels
depend on the image only, so the stack is linear in the features and, with ``feat_dim=None``, one trained
stack serves any backbone.

Layouts are named variants (``JBUStack(variant=...)``, registry names in brackets): ``"default"`` [``jbu``],
the layout decided on real photos; ``"paper"`` [``jbu_paper``], eq. 3-6 as written; ``"original"``
[``jbu_original``], the original code's layout, which loads its weights. The flags that remain are
hyperparameters. Why the default departs from the paper: docs/decisions.md#j1 (J1-J4) and #jbu-safe-fused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError, CheckpointMixin
from featup.core.consistency import BACK_PROJECTION_MODES, back_project, block_mean, lift_rows
from featup.core.guidance import GuidanceEncoder
from featup.core.registry import register_upsampler
from featup.kernels import adaptive_conv

try:  # featup-kernels builds before these ops: one adaptive_conv per phase, the full backward op
    from featup.kernels import adaptive_conv_filter_grad, adaptive_conv_phases, has_adaptive_conv_phases
except ImportError:  # pragma: no cover - depends on the installed kernels build

    def has_adaptive_conv_phases(device: Any = "cpu") -> bool:
        return False

    adaptive_conv_phases = adaptive_conv_filter_grad = None  # type: ignore[assignment]

try:  # featup-kernels builds before this op: the back-projection pools the output afterwards
    from featup.kernels import adaptive_conv_phases_pooled, has_adaptive_conv_phases_pooled
except ImportError:  # pragma: no cover - depends on the installed kernels build

    def has_adaptive_conv_phases_pooled(device: Any = "cpu") -> bool:
        return False

    adaptive_conv_phases_pooled = None  # type: ignore[assignment]

try:  # featup-kernels builds before these ops: the back-projection is added after the last stage
    from featup.kernels import adaptive_conv_phases_lifted, footprint_sums, has_adaptive_conv_phases_lifted
except ImportError:  # pragma: no cover - depends on the installed kernels build

    def has_adaptive_conv_phases_lifted(device: Any = "cpu") -> bool:
        return False

    adaptive_conv_phases_lifted = footprint_sums = None  # type: ignore[assignment]

try:  # featup-kernels builds before this op: the stage kernels are computed with torch ops
    from featup.kernels import has_jbu_stage_kernel, jbu_stage_kernel
except ImportError:  # pragma: no cover - depends on the installed kernels build

    def has_jbu_stage_kernel(device: Any = "cpu") -> bool:
        return False

    jbu_stage_kernel = None  # type: ignore[assignment]

try:  # featup-kernels builds before this op: the composite filters are built with torch ops
    from featup.kernels import has_jbu_stage_filters, jbu_stage_filters
except ImportError:  # pragma: no cover - depends on the installed kernels build

    def has_jbu_stage_filters(device: Any = "cpu") -> bool:
        return False

    jbu_stage_filters = None  # type: ignore[assignment]

__all__ = [
    "RANGE_KERNELS",
    "VARIANTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JBUStack",
    "JBUStage",
    "apply_kernel",
    "neighborhood_dot",
    "neighborhood_sqdist",
    "pad2d",
    "pool_guidance",
    "resize",
    "spatial_gaussian",
    "stage_sizes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: how the range kernel compares the centre key with each neighbour's: ``"distance"`` (default)
#: softmax(-temp * |k_p - k_q|^2), a Gaussian on the keys; ``"dot"`` softmax(temp * <k_p, k_q>), eq. 5 as written
RANGE_KERNELS = ("distance", "dot")

#: the named layouts of :class:`JBUStack` (``variant=``): the layout choices each one fixes
VARIANTS: dict[str, dict[str, Any]] = {
    # distance range kernel on guidance-encoder keys, a bounded zero-sum kernel correction per stage
    "default": {
        "range_kernel": "distance",
        "guidance_encoder": True,
        "kernel_fixup": True,
        "constrained_fixup": True,
    },
    # eq. 4-6: inner-product range kernel on a 1x1 MLP of the pooled image, no correction
    "paper": {
        "range_kernel": "dot",
        "guidance_encoder": False,
        "kernel_fixup": False,
        "constrained_fixup": False,
    },
    # the original code: eq. 4-6 plus its unconstrained correction and final 1x1 conv (see JBUStack)
    "original": {
        "range_kernel": "dot",
        "guidance_encoder": False,
        "kernel_fixup": True,
        "constrained_fixup": False,
    },
}
#: the layout flags a variant replaces (accepted with a DeprecationWarning; ``config()`` still records them)
_LAYOUT_FLAGS = ("range_kernel", "guidance_encoder", "kernel_fixup", "constrained_fixup", "original")
#: whether each variant starts safe (``safe_start=None``); a custom layout starts as "default" does
_SAFE_START = {"default": True, "paper": False, "original": False}


def _layout(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``, normalised (a correction that is off is not constrained either)."""
    unknown = sorted(set(changes) - set(VARIANTS["default"]))
    if unknown:
        raise TypeError(
            f"unexpected JBUStack layout option(s) {unknown}; expected some of {_LAYOUT_FLAGS[:4]}"
        )
    out = {**base, **changes}
    if out["range_kernel"] not in RANGE_KERNELS:
        raise ValueError(f"expected range_kernel in {RANGE_KERNELS}, got {out['range_kernel']!r}")
    out["guidance_encoder"], out["kernel_fixup"] = bool(out["guidance_encoder"]), bool(out["kernel_fixup"])
    out["constrained_fixup"] = bool(out["kernel_fixup"] and out["constrained_fixup"])
    return out


def _variant_name(layout: Mapping[str, Any], original: bool) -> str | None:
    """The named variant with this layout, or None (a custom layout)."""
    if original:
        return "original"
    return next((name for name in ("default", "paper") if VARIANTS[name] == dict(layout)), None)


def _custom(layout: Mapping[str, Any]) -> dict[str, Any]:
    """A custom layout as ``variant=`` takes it: the choices that differ from the default layout (an absent
    correction implies an unconstrained one)."""
    base = _layout(VARIANTS["default"], {"kernel_fixup": layout["kernel_fixup"]})
    out = {k: v for k, v in layout.items() if base[k] != v}
    return {"kernel_fixup": False, **out} if not layout["kernel_fixup"] else out


def _resolve_variant(
    variant: str | Mapping[str, Any], flags: Mapping[str, Any]
) -> tuple[dict[str, Any], bool, str]:
    """(layout, original, the variant whose defaults apply) from ``variant`` and the deprecated flags."""
    unknown = sorted(set(flags) - set(_LAYOUT_FLAGS))
    if unknown:
        raise TypeError(f"JBUStack got unexpected keyword argument(s) {unknown}")
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"expected variant in {tuple(VARIANTS)} or a layout mapping, got {variant!r}")
        base, layout = variant, dict(VARIANTS[variant])
    elif isinstance(variant, Mapping):
        base, layout = "default", _layout(VARIANTS["default"], variant)
    else:
        raise TypeError(
            f"expected variant as a name in {tuple(VARIANTS)} or a layout mapping, got {type(variant).__name__}"
        )
    original = bool(flags.get("original", base == "original"))
    if base == "original" and not original:
        raise ValueError("expected original=False only with another variant than 'original'")
    layout = _layout(layout, {k: v for k, v in flags.items() if k != "original"})  # validates the flags
    if original:  # the original layout fixes every choice
        return dict(VARIANTS["original"]), True, "original"
    return layout, False, base


def _deprecated_flags(flags: Mapping[str, Any], variant: str | dict[str, Any], safe_start: bool) -> None:
    """Warn that layout flags are deprecated, naming the ``variant=`` (and ``safe_start=``) to use instead."""
    start = _SAFE_START[variant] if isinstance(variant, str) else _SAFE_START["default"]
    use = f"variant={variant!r}" + (f", safe_start={safe_start}" if safe_start != start else "")
    given = ", ".join(f"{k}={v!r}" for k, v in flags.items())
    warnings.warn(
        f"JBUStack({given}) is deprecated: use JBUStack({use})"
        + (
            ""
            if isinstance(variant, str)
            else f" (a custom layout: the named variants are {tuple(VARIANTS)})"
        ),
        DeprecationWarning,
        stacklevel=3,
    )


#: a last stage may go up to 2**0.1 ~ 2.14x rather than adding a nearly-1x stage after a 2x one
_STAGE_SLACK = 0.1


def stage_sizes(in_size: Sequence[int], out_size: Sequence[int]) -> list[tuple[int, int]]:
    """Sizes of the successive 2x stages from ``in_size`` to exactly ``out_size``.

    ``n = ceil(log2(max ratio) - 0.1)`` stages (at least one); stage ``k < n`` has size
    ``min(in * 2**k, out)`` per dimension and the last one is ``out``. A 16x ratio gives the original four 2x
    stages; a dimension that shrinks goes straight to its target.

    Shape:
        - in_size: (h, w); out_size: (H, W)
        - output: list of (H_k, W_k), the last equal to (H, W)
    """
    h, w = int(in_size[0]), int(in_size[1])
    out_h, out_w = int(out_size[0]), int(out_size[1])
    ratio = max(out_h / h, out_w / w)
    n = max(1, math.ceil(math.log2(ratio) - _STAGE_SLACK)) if ratio > 1 else 1
    sizes = [(min(h * 2**k, out_h), min(w * 2**k, out_w)) for k in range(1, n)]
    return sizes + [(out_h, out_w)]


def pad2d(x: torch.Tensor, radius: int, mode: str = "reflect") -> torch.Tensor:
    """Pad the last two dims by ``radius``; ``reflect`` falls back to ``replicate`` on maps too small for it.

    Shape:
        - x: (B, C, H, W)
        - output: (B, C, H + 2r, W + 2r)
    """
    if radius == 0:
        return x
    if mode == "reflect" and min(x.shape[-2:]) <= radius:
        mode = "replicate"  # reflect padding needs more than `radius` pixels per side
    return F.pad(x, [radius] * 4, mode=mode)


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample to ``size`` (align_corners=False; anti-aliased when shrinking; identity at equal size).

    Shape:
        - x: (B, C, h, w)
        - output: (B, C, H, W)
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode in ("nearest", "nearest-exact"):
        return F.interpolate(x, size=size, mode=mode)
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrinking)


def pool_guidance(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The guidance for one stage: the image average-pooled to ``size`` (bilinear where ``size`` is larger).

    Shape:
        - image: (B, 3, H, W)
        - output: (B, 3, size[0], size[1])
    """
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    if size[0] <= image.shape[-2] and size[1] <= image.shape[-1]:
        return F.adaptive_avg_pool2d(image, size)
    return resize(image, size, "bilinear")


def _pointwise_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a Sequential of 1x1 convolutions and activations with the convolutions as matrix products
    (torch's CPU 1x1 convolution is a slow im2col path). Dropout and activations run as modules."""
    b, _, h, w = x.shape
    for layer in mlp:
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
            weight = layer.weight.flatten(1).to(x.dtype)
            flat = x.reshape(b, -1, h * w)
            if layer.bias is None:
                x = torch.matmul(weight, flat)
            else:
                x = torch.baddbmm(layer.bias.to(x.dtype).view(1, -1, 1), weight.expand(b, -1, -1), flat)
            x = x.view(b, -1, h, w)
        else:
            x = layer(x)
    return x


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast on ``device`` for the enclosed block (nothing to do where it is off)."""
    kind = device.type
    if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


def _to_param_precision(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Cast autocast-lowered activations (float16 / bfloat16) back up to a float32 (or float64) module."""
    low = (torch.float16, torch.bfloat16)
    return x.to(param.dtype) if x.dtype in low and param.dtype not in low else x


def _taps(radius: int) -> list[tuple[int, int]]:
    diameter = 2 * radius + 1
    return [(i, j) for i in range(diameter) for j in range(diameter)]


class _NeighborhoodDot(torch.autograd.Function):
    """``dots[b, h, w, i, j] = sum_c q[b, c, h, w] * q_pad[b, c, h + i, w + j]`` on the fused op.

    That sum is the filter gradient of ``adaptive_conv(q_pad, filters)`` for an output gradient ``q``, and
    its own gradients are one adaptive convolution (for ``q``) and one input gradient (for ``q_pad``).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, qp: torch.Tensor, diameter: int) -> torch.Tensor:
        b, _, h, w = q.shape
        if adaptive_conv_filter_grad is not None:
            dots = adaptive_conv_filter_grad(q, qp)
        else:  # an older featup-kernels build: the op's input gradient is computed and discarded
            unused_filters = q.new_zeros(b, h, w, diameter, diameter)
            dots = torch.ops.featup.adaptive_conv_backward(q, qp, unused_filters)[1]
        ctx.save_for_backward(q, qp)
        return dots

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        q, qp = ctx.saved_tensors
        dtype = torch.promote_types(q.dtype, grad.dtype)  # under autocast the two can differ
        q_, qp_, grad = q.to(dtype), qp.to(dtype), grad.to(dtype).contiguous()
        grad_q = adaptive_conv(qp_, grad).to(q.dtype) if ctx.needs_input_grad[0] else None
        grad_qp = None
        if ctx.needs_input_grad[1]:
            grad_qp = torch.ops.featup.adaptive_conv_backward(q_, qp_, grad)[0].to(qp.dtype)
        return grad_q, grad_qp, None


def neighborhood_dot(q: torch.Tensor, radius: int, pad_mode: str = "reflect") -> torch.Tensor:
    """Inner products between every pixel's vector and its K x K neighbors' (K = 2 * radius + 1).

    ``out[b, i * K + j, h, w] = <q[b, :, h, w], q_pad[b, :, h + i, w + j]>``, one pass of the fused op: the
    memory is O(K^2 H W), not O(C K^2 H W) as with ``unfold``. Differentiable once in ``q``.

    Shape:
        - q: (B, C, H, W)
        - output: (B, K * K, H, W)
    """
    b, _, h, w = q.shape
    diameter = 2 * radius + 1
    dots = _NeighborhoodDot.apply(q, pad2d(q, radius, pad_mode), diameter)
    return dots.reshape(b, h, w, diameter * diameter).permute(0, 3, 1, 2)


def neighborhood_sqdist(g: torch.Tensor, radius: int, pad_mode: str = "reflect") -> torch.Tensor:
    """Squared Euclidean distances between every pixel's vector and its K x K neighbors'.

    ``|a - b|^2 = |a|^2 + |b|^2 - 2 <a, b>`` with the inner products of :func:`neighborhood_dot`; clamped at
    zero against rounding.

    Shape:
        - g: (B, C, H, W)
        - output: (B, K * K, H, W), tap index ``i * K + j`` as in :func:`neighborhood_dot`
    """
    b, _, h, w = g.shape
    diameter = 2 * radius + 1
    norms = g.square().sum(1, keepdim=True)
    neighbor_norms = F.unfold(pad2d(norms, radius, pad_mode), diameter).view(b, diameter * diameter, h, w)
    return (norms + neighbor_norms - 2 * neighborhood_dot(g, radius, pad_mode)).clamp_min(0)


def _neighborhood_sqdist_pixel_major(
    g: torch.Tensor, radius: int, pad_mode: str = "reflect", scale: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`neighborhood_sqdist` as one neighbourhood product, pixel-major (B, H, W, K*K).

    ``<[-2 g_p, 1, |g_p|^2], [g_q, |g_q|^2, 1]> = |g_p - g_q|^2``, so the norms ride along as two channels.
    With ``scale`` (a positive scalar tensor) it returns ``-scale * distance`` (the range kernel's logits),
    the factor riding on the centre vector instead of costing a pass over the result.
    """
    b, _, h, w = g.shape
    diameter = 2 * radius + 1
    norms = g.square().sum(1, keepdim=True)
    ones = torch.ones_like(norms)
    if scale is None:
        centre = torch.cat([g * -2, ones, norms], 1)
    else:
        centre = torch.cat([g * (2 * scale), ones * -scale, norms * -scale], 1)
    neighbours = pad2d(torch.cat([g, norms, ones], 1), radius, pad_mode)
    dist = _NeighborhoodDot.apply(centre, neighbours, diameter).reshape(b, h, w, diameter * diameter)
    return dist.clamp_min(0) if scale is None else dist.clamp_max(0)


#: Kopf et al.'s fixed joint bilateral kernel: spatial sigma (window coordinates), range sigma (RGB in [0, 1])
CLASSIC_SIGMAS = (0.5, 0.1)

#: what a safe-start stage starts from: ``"classic"`` Kopf's JBU (default), ``"delta"`` its source resize alone
BASE_KERNELS = ("classic", "delta")


def classic_kernel(
    image: torch.Tensor,
    radius: int,
    sigma_spatial: float = CLASSIC_SIGMAS[0],
    sigma_range: float = CLASSIC_SIGMAS[1],
    pad_mode: str = "reflect",
    pixel_major: bool = False,
) -> torch.Tensor:
    """Kopf et al.'s joint bilateral kernel on RGB, normalized over the K x K window.

    ``k = exp(-|g_c - g_n|^2 / (2 sigma_range^2)) * exp(-|d|^2 / (2 sigma_spatial^2))``, d in [-1, 1]
    window coordinates.

    Shape:
        - image: (B, 3, H, W) at the stage's resolution
        - output: (B, K*K, H, W), or (B, H, W, K*K) with ``pixel_major``
    """
    spatial = spatial_gaussian(radius, torch.tensor(float(sigma_spatial), dtype=image.dtype)).to(image.device)
    if pixel_major:
        sqdist = _neighborhood_sqdist_pixel_major(image, radius, pad_mode)
    else:
        sqdist = neighborhood_sqdist(image, radius, pad_mode)
        spatial = spatial.view(1, -1, 1, 1)
    kernel = torch.exp(sqdist / (-2 * float(sigma_range) ** 2)) * spatial
    return kernel / kernel.sum(-1 if pixel_major else 1, keepdim=True)  # the centre tap is > 0


def _mirrored_taps(diameter: int, device: torch.device) -> torch.Tensor:
    """Tap order of the left-right mirrored window: tap ``i * K + j`` becomes ``i * K + (K - 1 - j)``."""
    return torch.arange(diameter * diameter, device=device).view(diameter, diameter).flip(1).reshape(-1)


def spatial_gaussian(radius: int, sigma: torch.Tensor | float) -> torch.Tensor:
    """Eq. 5 on the K x K window with coordinates normalized to [-1, 1] (resolution independent).

    Shape:
        - output: (K * K,), tap index ``i * K + j``
    """
    sigma = torch.as_tensor(sigma)
    coords = torch.linspace(-1, 1, 2 * radius + 1, device=sigma.device, dtype=sigma.dtype)
    d2 = coords[:, None].square() + coords[None, :].square()
    return torch.exp(-d2 / (2 * sigma.square())).reshape(-1)


def _log_spatial_gaussian(radius: int, sigma: torch.Tensor) -> torch.Tensor:
    """``log(spatial_gaussian(radius, sigma))``, computed as the exponent (finite where the Gaussian
    underflows to 0)."""
    coords = torch.linspace(-1, 1, 2 * radius + 1, device=sigma.device, dtype=sigma.dtype)
    d2 = coords[:, None].square() + coords[None, :].square()
    return (-d2 / (2 * sigma.square())).reshape(-1)


def apply_kernel(
    source: torch.Tensor,
    kernel: torch.Tensor,
    radius: int,
    *,
    resize_mode: str = "bilinear",
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Resample ``source`` to the kernel's grid, pad it and apply one K x K kernel per pixel (adaptive conv).

    Shape:
        - source: (B, C, h, w)
        - kernel: (B, K * K, H, W), tap index ``i * K + j``
        - output: (B, C, H, W)
    """
    b, kk, h, w = kernel.shape
    diameter = 2 * radius + 1
    if kk != diameter * diameter:
        raise ValueError(
            f"expected kernel (B,{diameter * diameter},H,W) for radius {radius}, got {tuple(kernel.shape)}"
        )
    src = pad2d(resize(source, (h, w), resize_mode), radius, pad_mode)
    filters = kernel.permute(0, 2, 3, 1).reshape(b, h, w, diameter, diameter).to(src.dtype)
    return adaptive_conv(src, filters)


def _resolved_pad_mode(size: Sequence[int], radius: int, pad_mode: str) -> str:
    """The mode :func:`pad2d` really uses on a map of ``size`` (reflect needs more than ``radius`` pixels)."""
    return "replicate" if pad_mode == "reflect" and min(size) <= radius else pad_mode


@functools.lru_cache(maxsize=64)
def _resize_pad_plan(
    n: int, factor: int, radius: int, resize_mode: str, pad_mode: str, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor, list[torch.Tensor]]:
    """One dimension of "resize by ``factor``, pad, take the K taps" as a window on the low-res source.

    Row ``y`` of the output reads taps ``pad(resize(x))[y + i]``, i < K; that is ``sum_a A[y, i, a] *
    x[s(y) + a]`` with ``s(y) = y // factor + offset`` and ``a < width``. The resize weights are torch's own
    (the interpolation of an identity), so border clamping and padding are exactly the plain path's.

    Returns:
        A (n * factor, K, width); offset; per phase p the matrix shared by its rows ``y = factor * m + p``
        away from the borders (factor, K, width); per phase the indices m of the rows whose A differs.
    """
    with torch.inference_mode(False), torch.no_grad():  # cached: usable in and out of inference mode
        return _build_resize_pad_plan(n, factor, radius, resize_mode, pad_mode, dtype)


def _build_resize_pad_plan(
    n: int, factor: int, radius: int, resize_mode: str, pad_mode: str, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor, list[torch.Tensor]]:
    big, diameter = n * factor, 2 * radius + 1
    calc = torch.float64 if dtype == torch.float64 else torch.float32
    eye = torch.eye(n, dtype=calc).view(1, n, n, 1)
    weights = resize(eye, (big, 1), resize_mode)[0, :, :, 0].t()  # (big, n): row y of resize as weights
    index = torch.arange(big, dtype=calc).view(1, 1, big)
    index = F.pad(index, [radius, radius], mode=pad_mode)[0, 0].long() if radius else index[0, 0].long()
    taps = index.unfold(0, diameter, 1)  # (big, K): the resized row each tap reads
    per_tap = weights[taps]  # (big, K, n)
    nonzero = per_tap.ne(0).any(1)  # (big, n)
    cols = torch.arange(n)
    lo = torch.where(nonzero, cols, n).min(1).values
    hi = torch.where(nonzero, cols, -1).max(1).values
    base = torch.arange(big) // factor
    offset = int((lo - base).min())
    width = int((hi - base - offset).max()) + 1
    window = (base + offset)[:, None] + torch.arange(
        width
    )  # (big, width) source rows, may lie outside [0, n)
    inside = (window >= 0) & (window < n)
    gathered = per_tap.gather(2, window.clamp(0, n - 1)[:, None, :].expand(-1, diameter, -1))
    a = torch.where(inside[:, None, :], gathered, 0).to(dtype).view(n, factor, diameter, width)
    interior = a[n // 2]  # (factor, K, width)
    special = [torch.nonzero((a[:, p] != interior[p]).flatten(1).any(1)).flatten() for p in range(factor)]
    return a.view(big, diameter, width), offset, interior, special


def _fused_factor(n: int, big: int) -> int | None:
    return big // n if big in (n, 2 * n) else None


def _fused_geometry(
    h: int, w: int, big_h: int, big_w: int, radius: int, resize_mode: str, pad_mode: str, dtype: torch.dtype
) -> tuple | None:
    """The plans of both dimensions, the common window width and the source padding [l, r, t, b] of a
    fusable stage (1x or 2x per dimension); None for the others."""
    fy, fx = _fused_factor(h, big_h), _fused_factor(w, big_w)
    if fy is None or fx is None:
        return None
    mode = _resolved_pad_mode((big_h, big_w), radius, pad_mode)
    plan_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    py = _resize_pad_plan(h, fy, radius, resize_mode, mode, plan_dtype)
    px = _resize_pad_plan(w, fx, radius, resize_mode, mode, plan_dtype)
    width = max(py[0].shape[-1], px[0].shape[-1])  # the op takes square kernels: widen one window with zeros
    oy, ox = py[1], px[1]
    pad = [max(0, -ox), max(0, ox + width - 1), max(0, -oy), max(0, oy + width - 1)]
    return fy, fx, py, px, width, pad


def apply_kernel_fused(
    source: torch.Tensor,
    kernel: torch.Tensor,
    radius: int,
    *,
    resize_mode: str = "bilinear",
    pad_mode: str = "reflect",
    source_padding: Sequence[int] | None = None,
    out_padding: Sequence[int] | None = None,
    cell_means: Sequence[int] | None = None,
    back_project_to: torch.Tensor | None = None,
    back_project_mode: str = "bicubic",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply_kernel` without materialising the resized, padded source (same result to rounding).

    Resize, padding and the per-pixel kernel are all linear, so each output pixel is a ``W x W`` kernel on
    the low-res source (W = 7 for a 2x bicubic stage with K = 7): the composite is built per pixel from the
    K x K kernel and the separable resize weights, and applied with one adaptive convolution per output
    phase (1, 2 or 4) on the low-res grid. Stages that are neither 1x nor 2x per dimension take the plain
    path.

    Args:
        source_padding: ``source`` already carries zero margins [l, r, t, b] around the (h, w) map (the
            previous stage wrote it so; saves a padded copy).
        out_padding: write the output into a buffer with zero margins [l, r, t, b] and return the buffer.
        cell_means: (cell_h, cell_w): return ``(output, means)`` with ``means`` the output's means over
            cell_h x cell_w cells (B, C, H / cell_h, W / cell_w), taken by the compiled op as it writes the
            output (saves the back-projection a pass over it), or None where the op does not apply.
        back_project_to: return ``back_project(output, back_project_to, mode=back_project_mode)`` (same
            value to float rounding). Where the compiled ops apply (CPU, no gradient, no autocast, no
            ``out_padding``, cells of a whole number of source pixels) the output's cell means are computed
            from the source before the output exists (they are linear in it) and the correction is added as
            each output row is written: the output is written once. Not with ``cell_means``.

    Shape:
        - source: (B, C, h, w), or (B, C, t + h + b, l + w + r) with ``source_padding``
        - kernel: (B, K * K, H, W)
        - output: (B, C, H, W), or (B, C, t + H + b, l + W + r) with ``out_padding``
    """
    if back_project_to is not None:
        return _apply_back_projected(
            source,
            kernel,
            radius,
            back_project_to,
            back_project_mode,
            resize_mode=resize_mode,
            pad_mode=pad_mode,
            source_padding=source_padding,
            out_padding=out_padding,
            cell_means=cell_means,
        )
    return _apply_kernel_fused(
        source,
        kernel,
        radius,
        resize_mode=resize_mode,
        pad_mode=pad_mode,
        source_padding=source_padding,
        out_padding=out_padding,
        cell_means=cell_means,
    )


def _apply_back_projected(
    source: torch.Tensor,
    kernel: torch.Tensor,
    radius: int,
    lr: torch.Tensor,
    mode: str,
    *,
    resize_mode: str,
    pad_mode: str,
    source_padding: Sequence[int] | None,
    out_padding: Sequence[int] | None,
    cell_means: Sequence[int] | None,
) -> torch.Tensor:
    """:func:`apply_kernel_fused` with ``back_project_to=lr``: the fused correction where it applies,
    otherwise the output (with its cell means from the op where it can) then :func:`back_project`."""
    if cell_means is not None:
        raise ValueError("expected back_project_to or cell_means, not both")
    if mode not in BACK_PROJECTION_MODES:
        raise ValueError(f"expected back_project_mode in {BACK_PROJECTION_MODES}, got {mode!r}")
    big_h, big_w = kernel.shape[-2:]
    if lr.dim() != 4 or lr.shape[:2] != source.shape[:2] or lr.shape[2] > big_h or lr.shape[3] > big_w:
        raise ValueError(
            f"expected back_project_to (B,C,h,w) with the source's B and C {tuple(source.shape[:2])} and at most "
            f"the output's size {(big_h, big_w)}, got {tuple(lr.shape)}"
        )
    lr_h, lr_w = lr.shape[-2:]
    cells = (big_h // lr_h, big_w // lr_w) if big_h % lr_h == 0 and big_w % lr_w == 0 else None
    if out_padding is not None and any(out_padding):
        cells = None  # the op pools only unpadded outputs; back_project pools the returned map
    out, means = _apply_kernel_fused(
        source,
        kernel,
        radius,
        resize_mode=resize_mode,
        pad_mode=pad_mode,
        source_padding=source_padding,
        out_padding=out_padding,
        cell_means=cells,
        lift=(lr, mode),
    )
    if means is _LIFTED:
        return out
    inplace = not (torch.is_grad_enabled() and out.requires_grad)
    return back_project(out, lr, mode=mode, inplace=inplace, hr_means=means)


#: the sentinel :func:`_apply_kernel_fused` returns as "means" when the back-projection is already added
_LIFTED = torch.empty(0)


def _apply_kernel_fused(
    source: torch.Tensor,
    kernel: torch.Tensor,
    radius: int,
    *,
    resize_mode: str,
    pad_mode: str,
    source_padding: Sequence[int] | None,
    out_padding: Sequence[int] | None,
    cell_means: Sequence[int] | None,
    lift: tuple[torch.Tensor, str] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    b, kk, big_h, big_w = kernel.shape
    diameter = 2 * radius + 1
    if source_padding is not None:
        left, right, top, bottom = source_padding
        buffer = source
        source = source[..., top : source.shape[-2] - bottom, left : source.shape[-1] - right]
    h, w = source.shape[-2:]
    geometry = None
    if kk == diameter * diameter:
        geometry = _fused_geometry(h, w, big_h, big_w, radius, resize_mode, pad_mode, kernel.dtype)
    deferred = kernel if isinstance(kernel, _DeferredKernel) else None
    if geometry is None:
        kernel = kernel.tensor() if deferred is not None else kernel
        out = apply_kernel(source, kernel, radius, resize_mode=resize_mode, pad_mode=pad_mode)
        out = F.pad(out, list(out_padding)) if out_padding is not None else out
        return out if cell_means is None else (out, None)
    fy, fx, (ay, oy, iy, sy), (ax, ox, ix, sx), width, pad = geometry
    dev, plan_dtype = kernel.device, ay.dtype
    ay, iy = F.pad(ay, [0, width - ay.shape[-1]]).to(dev), F.pad(iy, [0, width - iy.shape[-1]]).to(dev)
    ax, ix = F.pad(ax, [0, width - ax.shape[-1]]).to(dev), F.pad(ix, [0, width - ix.shape[-1]]).to(dev)
    if deferred is not None and not (
        has_adaptive_conv_phases(dev) and not torch.is_autocast_enabled(dev.type)
    ):
        kernel, deferred = deferred.tensor(), None  # the per-phase loop below reads the kernels
    if (
        deferred is None
    ):  # pixel-major kernels (free if they come from JBUStage.kernel), split by phase (p, q)
        k = kernel.permute(0, 2, 3, 1).to(plan_dtype).reshape(b, h, fy, w, fx, diameter, diameter)
    if source_padding is not None and list(source_padding) == pad:
        src = buffer
    else:
        src = F.pad(source, pad) if any(pad) else source
    src = src[..., max(0, oy) :, max(0, ox) :][..., : h + width - 1, : w + width - 1]
    channels = source.shape[1]
    del source
    if has_adaptive_conv_phases(src.device) and not torch.is_autocast_enabled(src.device.type):
        # every phase's composite filters in one tensor (straight from the stage kernel op where the stage
        # deferred its kernels), the phases written by one pass of the op
        if deferred is not None:
            filters = deferred.filters(ay, ax, (fy, fx)).to(src.dtype)
        else:
            filters = _phase_filters(k, ay, ax, iy, ix, sy, sx, fy, fx, diameter, width).to(src.dtype)
        if (
            lift is not None
            and cell_means is not None
            and _lifts_in_op(src, filters, lift[0], cell_means, fy, fx)
        ):
            return _phases_lifted(src, filters, lift[0], lift[1], cell_means, fy, fx), _LIFTED
        if cell_means is not None and _pools_in_op(src, filters, big_h, big_w, cell_means, out_padding):
            # the output's cell means from the row sums the op takes as it writes each row
            cell_h, cell_w = cell_means
            out, sums = adaptive_conv_phases_pooled(src, filters, [0, 0, 0, 0], cell_w)
            means = sums.unflatten(-2, (big_h // cell_h, cell_h)).sum(-2).div_(cell_h * cell_w)
            return out, means
        out = adaptive_conv_phases(src, filters, list(out_padding or (0, 0, 0, 0)))
        return out if cell_means is None else (out, None)
    out: torch.Tensor | None = None
    result: torch.Tensor | None = None
    for p in range(fy):
        for q in range(fx):
            filters = _phase_filters(k, ay, ax, iy, ix, sy, sx, fy, fx, diameter, width, (p, q))[:, 0, 0]
            res = adaptive_conv(src, filters.to(src.dtype))
            if fy == fx == 1 and out_padding is None:
                return res if cell_means is None else (res, None)
            if out is None:  # the op's output dtype (the autocast dtype under autocast)
                result, out = _output_buffer(res, big_h, big_w, out_padding)
                out = out.view(b, channels, h, fy, w, fx)
            out[:, :, :, p, :, q] = res
    assert result is not None
    return result if cell_means is None else (result, None)


def _pools_in_op(
    src: torch.Tensor,
    filters: torch.Tensor,
    big_h: int,
    big_w: int,
    cell_means: Sequence[int],
    out_padding: Sequence[int] | None,
) -> bool:
    """Whether the compiled op can also return the output's (cell_h, cell_w) cell sums: a build and device
    that have it, cells tiling the output, no margins, no gradient needed (the op has no backward)."""
    cell_h, cell_w = (int(v) for v in cell_means)
    if out_padding is not None and any(out_padding):
        return False
    if cell_h < 1 or cell_w < 1 or big_h % cell_h or big_w % cell_w:
        return False
    if torch.is_grad_enabled() and (src.requires_grad or filters.requires_grad):
        return False
    return has_adaptive_conv_phases_pooled(src.device)


def _lifts_in_op(
    src: torch.Tensor, filters: torch.Tensor, lr: torch.Tensor, cells: Sequence[int], fy: int, fx: int
) -> bool:
    """Whether the compiled ops can add the back-projection as the last stage writes its output: a build and
    device that have them, cells of a whole number of source pixels, no gradient needed (no backward)."""
    cell_h, cell_w = cells
    if cell_h % fy or cell_w % fx or lr.device != src.device:
        return False
    if torch.is_grad_enabled() and (src.requires_grad or filters.requires_grad or lr.requires_grad):
        return False
    return has_adaptive_conv_phases_lifted(src.device) and not torch.is_autocast_enabled(src.device.type)


def _phases_lifted(
    src: torch.Tensor,
    filters: torch.Tensor,
    lr: torch.Tensor,
    mode: str,
    cells: Sequence[int],
    fy: int,
    fx: int,
) -> torch.Tensor:
    """``back_project(adaptive_conv_phases(src, filters), lr, mode=mode)`` with the output written once.

    The output's mean over cell (i, j) is linear in ``src``: ``sum_uv G[i, j, u, v] src[sy i + u, sx j + v]``
    with ``G`` the cell's composite filters (summed over the phases) added up at the source pixels they read
    (a fold, channel-independent), and sy x sx the source pixels of a cell. So the residual and its lifted
    correction are known before the output is, and the op adds the correction to each row as it writes it.

    Shape:
        - src: (B, C, h + W - 1, w + W - 1); filters: (B, fy, fx, h, w, W, W); lr: (B, C, lr_h, lr_w)
        - output: (B, C, fy h, fx w)
    """
    n_b, _, _, h, w, width = filters.shape[:6]
    cell_h, cell_w = cells
    sy, sx = cell_h // fy, cell_w // fx
    lr_h, lr_w = h // sy, w // sx
    per_cell = (
        filters.sum((1, 2))
        .reshape(n_b, lr_h, sy, lr_w, sx, width, width)
        .permute(0, 1, 3, 5, 6, 2, 4)
        .reshape(n_b * lr_h * lr_w, width * width, sy * sx)
    )
    footprint = (sy + width - 1, sx + width - 1)
    weights = F.fold(per_cell, footprint, (width, width)).view(n_b, lr_h, lr_w, *footprint)
    means = footprint_sums(src, weights.div_(cell_h * cell_w), (sy, sx))
    rows, row_weights, row_start = lift_rows(lr.to(src.dtype) - means, (fy * h, fx * w), mode)
    return adaptive_conv_phases_lifted(src, filters, rows, row_start, row_weights)


def _phase_filters(
    k: torch.Tensor,
    ay: torch.Tensor,
    ax: torch.Tensor,
    iy: torch.Tensor,
    ix: torch.Tensor,
    sy: list[torch.Tensor],
    sx: list[torch.Tensor],
    fy: int,
    fx: int,
    diameter: int,
    width: int,
    phase: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The composite W x W filters on the low-res source of every output phase (or of one ``phase``).

    Shape:
        - k: (B, h, fy, w, fx, K, K), the stage's pixel-major kernels split by output phase
        - output: (B, fy, fx, h, w, W, W), or (B, 1, 1, h, w, W, W) for one phase
    """
    b, h, _, w = k.shape[:4]
    kk, dev = diameter * diameter, k.device
    phases = [phase] if phase is not None else [(p, q) for p in range(fy) for q in range(fx)]
    n_y, n_x = (1, 1) if phase is not None else (fy, fx)
    # away from the borders every pixel of a phase has the same composite map: one matrix product
    shared = torch.stack(
        [torch.einsum("ia,jc->ijac", iy[p], ix[q]).reshape(kk, width * width) for p, q in phases]
    )
    kp = torch.stack([k[:, :, p, :, q] for p, q in phases], 1)  # (B, P, h, w, K, K)
    filters = torch.matmul(kp.reshape(b, len(phases), h * w, kk), shared).view(
        b, n_y, n_x, h, w, width, width
    )
    for i, (p, q) in enumerate(phases):
        rows, cols = sy[p].to(dev), sx[q].to(dev)
        ay_p, ax_q = ay.view(h, fy, diameter, width)[:, p], ax.view(w, fx, diameter, width)[:, q]
        kpq = kp[:, i]
        target = filters[:, i // n_x, i % n_x]
        if len(rows):
            target[:, rows] = torch.einsum("mia,bmnij,njc->bmnac", ay_p[rows], kpq[:, rows], ax_q)
        if len(cols):
            target[:, :, cols] = torch.einsum("mia,bmnij,njc->bmnac", ay_p, kpq[:, :, cols], ax_q[cols])
    return filters


def _output_buffer(
    like: torch.Tensor, big_h: int, big_w: int, padding: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor to return, the (B, C, H, W) region to write): a plain output, or one inside zero margins."""
    b, c = like.shape[:2]
    if padding is None:
        out = like.new_empty(b, c, big_h, big_w)
        return out, out
    left, right, top, bottom = padding
    rows, cols = top + big_h + bottom, left + big_w + right
    buf = like.new_empty(b, c, rows, cols)
    buf[..., :top, :].zero_()
    buf[..., top + big_h :, :].zero_()
    if left or right:
        # the right margin of row y and the left margin of row y + 1 are adjacent: one short run per row
        # (zeroing the two column strips separately is several times slower: millions of tiny runs)
        runs = buf.view(b * c, rows * cols).as_strided(
            (b * c, big_h - 1, left + right), (rows * cols, cols, 1), top * cols + left + big_w
        )
        runs.zero_()
        buf[..., top, :left].zero_()
        buf[..., top + big_h - 1, left + big_w :].zero_()
    return buf, buf[..., top : top + big_h, left : left + big_w]


def _pooled_guidances(
    guidance: torch.Tensor, sizes: Sequence[Sequence[int]]
) -> dict[tuple[int, int], torch.Tensor]:
    """:func:`pool_guidance` for every stage size, each pooled from the smallest map it divides exactly among
    those that are themselves block means of the full map (a mean of block means is the block mean: equal
    to pooling the full map, to float rounding), so the full-resolution map is read once, not per stage.

    Shape:
        - guidance: (B, G, H, W)
        - output: size -> (B, G, size[0], size[1])
    """
    full = tuple(guidance.shape[-2:])
    out: dict[tuple[int, int], torch.Tensor] = {}
    done = [(full, guidance)]  # maps pooled so far, largest first
    for size in sorted({(int(s[0]), int(s[1])) for s in sizes}, key=lambda s: (-s[0] * s[1], s)):
        source = guidance
        if size[0] <= full[0] and size[1] <= full[1]:
            for (h, w), pooled in reversed(done):  # the smallest map it divides
                if h % size[0] == 0 and w % size[1] == 0:
                    source = pooled
                    break
        sh, sw = source.shape[-2:]
        if size == (sh, sw):
            out[size] = source
        elif size[0] <= sh and size[1] <= sw and sh % size[0] == 0 and sw % size[1] == 0:
            out[size] = block_mean(source, sh // size[0], sw // size[1])  # adaptive pooling's means, faster
        else:
            out[size] = pool_guidance(source, size)
        if full[0] % size[0] == 0 and full[1] % size[1] == 0:  # block means of the full map: a valid source
            done.append((size, out[size]))
    return out


class _DeferredKernel:
    """A stage's kernels not yet computed: :func:`apply_kernel_fused` asks it for the composite filters of
    its resize-pad plan (one compiled pass, ``featup.kernels.jbu_stage_filters``: the K x K kernels are never
    written out) or, where that does not apply, for the kernels themselves (:meth:`JBUStage.kernel`).
    ``shape``, ``dtype`` and ``device`` are the kernels' (B, K*K, H, W)."""

    def __init__(self, stage: JBUStage, guidance: torch.Tensor, image: torch.Tensor | None) -> None:
        self.stage, self.guidance, self.image = stage, guidance, image
        b, _, h, w = guidance.shape
        self.shape = torch.Size((b, stage.diameter**2, h, w))
        self.dtype, self.device = guidance.dtype, guidance.device

    def tensor(self) -> torch.Tensor:
        with _without_autocast(self.device):
            return self.stage.kernel(self.guidance, self.image)

    def filters(self, rows: torch.Tensor, cols: torch.Tensor, phases: tuple[int, int]) -> torch.Tensor:
        """(B, py, px, H / py, W / px, Wd, Wd) for the plan's rows (H, K, Wd) and columns (W, K, Wd)."""
        with _without_autocast(self.device):
            return self.stage._filters_op(self.guidance, self.image, rows, cols, phases)


class JBUStage(nn.Module):
    """One learned joint bilateral upsampling stage (eq. 4-6) at the guidance's resolution.

    kernel = softmax_taps(-exp(range_temp) * |MLP(g_center) - MLP(g_neighbor)|^2) * spatial Gaussian,
    normalized to sum 1 (with ``range_kernel="dot"``:
    ``+exp(range_temp) * <MLP(g_center), MLP(g_neighbor)>``); optionally plus
    ``0.1 * fixup_proj([kernel, guidance])``, the original project's learned correction (not renormalized)
    or, with ``constrained_fixup``, that correction bounded, mirror-averaged and zero-sum. Parameter names
    follow the original project's stage, so its weights load as they are.

    Args:
        radius: neighborhood radius (K = 2 * radius + 1 taps per side).
        key_dim: width of the range MLP's hidden and output layers.
        guidance_dim: guidance channels (3 for RGB, the encoder's width behind a guidance encoder).
        dropout: Dropout2d rate inside the MLPs (training only).
        kernel_fixup: add the original project's learned kernel correction.
        constrained_fixup: bound that correction (tanh), make it left-right equivariant (averaged with its
            conjugate by the tap mirror) and zero-sum over the taps (the kernel still sums to 1); the
            original's is none of these.
        resize_mode: how the source is resampled to the stage size ("bicubic" as in the original code,
            "bilinear" as in the paper's text).
        pad_mode: border handling of keys and source ("reflect" falls back to "replicate" on tiny maps).
        init_sigma_spatial: initial width of the spatial Gaussian (window coordinates in [-1, 1]).
        range_kernel: ``"distance"`` or ``"dot"`` (see :data:`RANGE_KERNELS`).
        safe_start: gate the bilateral kernel with a zero-initialised scalar ``gate``:
            ``kernel = base + gate * (bilateral - base) [+ correction]``, and zero-initialise the
            correction's output layer, so a fresh stage is exactly ``base`` and training can only add to it.
            Without it (the paper's form) the stage starts as the bilateral kernel itself.
        base_kernel: ``base`` of the safe start (:data:`BASE_KERNELS`): ``"delta"`` the centre tap alone (the
            stage is its source resize) or ``"classic"`` Kopf's fixed JBU on the RGB image
            (:func:`classic_kernel`; the stage then needs ``image``).

    Shape:
        - source: (B, C, h, w)
        - guidance: (B, guidance_dim, H, W)
        - output: (B, C, H, W)
    """

    def __init__(
        self,
        radius: int = 3,
        key_dim: int = 32,
        guidance_dim: int = 3,
        *,
        dropout: float = 0.1,
        kernel_fixup: bool = False,
        resize_mode: str = "bicubic",
        pad_mode: str = "reflect",
        init_sigma_spatial: float = 1.0,
        range_kernel: str = "distance",
        constrained_fixup: bool = False,
        safe_start: bool = False,
        base_kernel: str = "delta",
    ) -> None:
        super().__init__()
        if base_kernel not in BASE_KERNELS:
            raise ValueError(f"expected base_kernel in {BASE_KERNELS}, got {base_kernel!r}")
        self.base_kernel = base_kernel if safe_start else "delta"
        if range_kernel not in RANGE_KERNELS:
            raise ValueError(f"expected range_kernel in {RANGE_KERNELS}, got {range_kernel!r}")
        self.range_kernel = range_kernel
        self.constrained_fixup = constrained_fixup
        self.radius = radius
        self.diameter = 2 * radius + 1
        self.key_dim = key_dim
        self.resize_mode = resize_mode
        self.pad_mode = pad_mode
        taps = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.sigma_spatial = nn.Parameter(torch.tensor(float(init_sigma_spatial)))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1),
            nn.GELU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(key_dim, key_dim, 1),
        )
        self.fixup_proj: nn.Module | None = None
        if kernel_fixup:
            self.fixup_proj = nn.Sequential(
                nn.Conv2d(guidance_dim + taps, taps, 1),
                nn.GELU(),
                nn.Dropout2d(dropout),
                nn.Conv2d(taps, taps, 1),
            )
        #: compute the kernels with featup.kernels.jbu_stage_kernel where it applies (see kernel_op_applies);
        #: False keeps the torch ops (not a hyperparameter: not saved)
        self.kernel_op = True
        self.safe_start = bool(safe_start)
        self.gate: nn.Parameter | None = None
        if self.safe_start:
            self.gate = nn.Parameter(torch.tensor(0.0))
            if self.fixup_proj is not None:
                nn.init.zeros_(self.fixup_proj[3].weight)
                nn.init.zeros_(self.fixup_proj[3].bias)

    def _needs_image(self, image: torch.Tensor | None) -> None:
        if self.gate is not None and self.base_kernel == "classic" and image is None:
            raise ValueError("a stage with base_kernel='classic' needs the image at its resolution, got None")

    def kernel(self, guidance: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The per-pixel kernels for this guidance (B, K*K, H, W) (and the RGB ``image`` (B, 3, H, W) at the
        same size with ``base_kernel="classic"``); they sum to 1 unless the original's unconstrained
        correction is on.

        Equal to :meth:`kernel_plain` up to float rounding, computed pixel-major (taps innermost, the layout
        the adaptive convolution reads; the result is a view of it): 1x1 convolutions as matrix products,
        the squared distances as one neighbourhood product, and the correction's mirrored evaluation as the
        same matrix product with its tap weights permuted.
        """
        self._needs_image(image)
        if self.kernel_op_applies(guidance):
            return self._kernel_op(guidance, image)
        taps = self.diameter**2
        b, _, h, w = guidance.shape
        keys = _pointwise_mlp(self.range_proj, guidance)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        if self.range_kernel == "distance":
            # softmax(l) * s / sum(softmax(l) * s) = softmax(l + log s): the spatial Gaussian enters as its
            # exponent and the softmax does the normalisation (the plain path's clamp of the sum at 1e-7
            # never acts here: the centre's logit 0 is the largest, so the sum is at least 1 / K^2)
            logits = _neighborhood_sqdist_pixel_major(keys, self.radius, self.pad_mode, scale=temp)
            logits = logits.add_(_log_spatial_gaussian(self.radius, self.sigma_spatial).to(logits.dtype))
            kernel = torch.softmax(logits, dim=-1)
            norm = None
        else:
            qp = pad2d(keys, self.radius, self.pad_mode)
            logits = _NeighborhoodDot.apply(keys, qp, self.diameter).reshape(b, h, w, taps) * temp
            spatial = spatial_gaussian(self.radius, self.sigma_spatial).to(logits.dtype)
            kernel = torch.softmax(logits, dim=-1) * spatial
            norm = kernel.sum(-1, keepdim=True).clamp_min(1e-7)
        if self.gate is None:
            kernel = kernel if norm is None else kernel / norm
            correction = None if self.fixup_proj is None else self._correction_pixel_major(kernel, guidance)
        else:
            # base + gate * (kernel - base): one pass over the taps
            fix = self.fixup_proj
            normalised = kernel if norm is None else kernel / norm
            correction = None if fix is None else self._correction_pixel_major(normalised, guidance)
            gate = self.gate.to(kernel.dtype)
            if self.base_kernel == "classic":
                assert image is not None
                base = classic_kernel(
                    image.to(kernel.dtype), self.radius, pad_mode=self.pad_mode, pixel_major=True
                )
            else:
                base = torch.zeros(taps, device=kernel.device, dtype=kernel.dtype)
                base[taps // 2] = 1.0
            if correction is None:
                kernel = torch.addcmul(base * (1 - gate), normalised, gate)
            else:  # in place on the correction, a fresh buffer of this function's own
                kernel = correction.add_(base * (1 - gate)).addcmul_(normalised, gate)
                correction = None
        if correction is not None:
            kernel = kernel + correction
        return kernel.permute(0, 3, 1, 2)

    def kernel_op_applies(self, guidance: torch.Tensor) -> bool:
        """Whether :meth:`kernel` computes these kernels with the compiled ``featup.kernels.jbu_stage_kernel``
        (one pass over tiles of pixels, no full-size intermediates): ``kernel_op`` on, a build that has it,
        the CPU, float32 / float64, the distance range kernel with no correction or the constrained one
        (GELU, dropout inactive), and no gradient needed (the op has no backward; training takes the torch
        ops)."""
        if not (self.kernel_op and has_jbu_stage_kernel(guidance.device)):
            return False
        dtype = self.range_temp.dtype
        if guidance.dtype != dtype or dtype not in (torch.float32, torch.float64):
            return False
        if self.range_kernel != "distance":
            return False
        fix = self.fixup_proj
        if fix is not None:
            if not self.constrained_fixup:
                return False
            _, act, drop, _ = fix
            if not (isinstance(act, nn.GELU) and act.approximate == "none"):
                return False
            if drop.training and drop.p > 0:
                return False
        if torch.is_grad_enabled() and (
            guidance.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return False
        return True

    def _kernel_op(self, guidance: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """:meth:`kernel` by ``featup.kernels.jbu_stage_kernel`` (see :meth:`kernel_op_applies`)."""
        keys, log_spatial, temp, kwargs = self._op_arguments(guidance, image)
        return jbu_stage_kernel(keys, log_spatial, temp, **kwargs).permute(0, 3, 1, 2)

    def _filters_op(
        self,
        guidance: torch.Tensor,
        image: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        phases: tuple[int, int],
    ) -> torch.Tensor:
        """The composite filters of a resize-pad plan by ``featup.kernels.jbu_stage_filters`` (the same
        kernels as :meth:`_kernel_op`, never written out)."""
        keys, log_spatial, temp, kwargs = self._op_arguments(guidance, image)
        dtype = keys.dtype
        return jbu_stage_filters(
            keys,
            log_spatial,
            temp,
            resize_rows=rows.to(dtype),
            resize_cols=cols.to(dtype),
            phases=phases,
            **kwargs,
        )

    def _op_arguments(
        self, guidance: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, Any]]:
        """(padded keys, log spatial Gaussian, temperature, keyword arguments) of the stage kernel ops."""
        dtype, r = guidance.dtype, self.radius
        keys = pad2d(_pointwise_mlp(self.range_proj, guidance), r, self.pad_mode)
        temp = float(self.range_temp.detach().exp().clamp(1e-4, 1e4))
        log_spatial = _log_spatial_gaussian(r, self.sigma_spatial.detach()).to(dtype).contiguous()
        kwargs: dict[str, Any] = {}
        if self.gate is not None:
            kwargs["gate"] = float(self.gate)
            if self.base_kernel == "classic":
                assert image is not None
                sigma_spatial, sigma_range = CLASSIC_SIGMAS
                kwargs["rgb"] = pad2d(image.to(dtype), r, self.pad_mode)
                kwargs["classic_log_spatial"] = _log_spatial_gaussian(
                    r, torch.tensor(float(sigma_spatial), dtype=dtype, device=guidance.device)
                )
                kwargs["classic_scale"] = -1.0 / (2 * float(sigma_range) ** 2)
        if self.fixup_proj is not None:
            first, _, _, second = self.fixup_proj
            taps = self.diameter**2
            w1 = first.weight.detach().flatten(1).to(dtype)
            kwargs.update(
                guidance=guidance,
                w1k=w1[:, :taps],
                w1g=w1[:, taps:],
                b1=first.bias.detach().to(dtype),
                w2=second.weight.detach().flatten(1).to(dtype),
                b2=second.bias.detach().to(dtype),
            )
        return keys, log_spatial, temp, kwargs

    def _correction_pixel_major(self, kernel: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """``0.1 * kernel_correction`` on pixel-major kernels (B, H, W, K*K): the mirrored evaluation
        ``fixup([kernel[:, m], g])[:, m]`` is the same MLP with its tap weights permuted by ``m``."""
        taps = self.diameter**2
        first, act, drop, second = self.fixup_proj
        dtype = first.weight.dtype
        w1, w2 = first.weight.flatten(1), second.weight.flatten(1)
        kernel = kernel.to(dtype)
        # as the plain path's cat, plus a column of ones that carries the first layer's bias (a matrix
        # product with a bias first copies the bias into its whole output)
        ones = kernel.new_ones(*kernel.shape[:-1], 1)
        inputs = torch.cat([kernel, guidance.to(dtype).permute(0, 2, 3, 1), ones], -1)

        def dropout(x: torch.Tensor) -> torch.Tensor:
            # Dropout2d draws one (B, C, 1, 1) mask per call, as the plain path's module calls do
            if not (drop.training and drop.p > 0):
                return x
            mask = drop(x.new_ones(x.shape[0], x.shape[-1], 1, 1)).view(x.shape[0], 1, 1, x.shape[-1])
            return x * mask

        if not self.constrained_fixup:
            hidden = dropout(act(F.linear(inputs, torch.cat([w1, first.bias[:, None]], 1))))
            return (0.1 * F.linear(hidden, w2, second.bias)).to(guidance.dtype)
        mirror = _mirrored_taps(self.diameter, kernel.device)
        # both evaluations in one product: the mirrored one reads the taps through the permutation
        both = torch.cat([w1, torch.cat([w1[:, :taps][:, mirror], w1[:, taps:]], 1)], 0)  # (2 taps, taps + G)
        both = torch.cat([both, first.bias.repeat(2)[:, None]], 1)
        hidden = act(F.linear(inputs, both).unflatten(-1, (2, taps)))
        out = F.linear(dropout(hidden[..., 0, :]), w2, second.bias).tanh()
        mirrored = F.linear(dropout(hidden[..., 1, :]), w2[mirror], second.bias[mirror]).tanh()
        correction = (out + mirrored).mul_(0.05)  # in place: no fresh full-size buffers (see kernel())
        return correction.sub_(correction.mean(-1, keepdim=True))

    def kernel_plain(self, guidance: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`kernel` computed step by step as the equations read (the test oracle of the fused path)."""
        self._needs_image(image)
        keys = self.range_proj(guidance)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        if self.range_kernel == "distance":
            logits = -temp * neighborhood_sqdist(keys, self.radius, self.pad_mode)
        else:
            logits = temp * neighborhood_dot(keys, self.radius, self.pad_mode)
        range_kernel = torch.softmax(logits, dim=1)
        kernel = range_kernel * spatial_gaussian(self.radius, self.sigma_spatial).view(1, -1, 1, 1)
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        correction = None
        if self.fixup_proj is not None:
            correction = 0.1 * self.kernel_correction(kernel, guidance)
        if self.gate is not None:
            # base + gate * (kernel - base): exactly the base while the gate is 0
            if self.base_kernel == "classic":
                assert image is not None
                base = classic_kernel(image.to(kernel.dtype), self.radius, pad_mode=self.pad_mode)
            else:
                base = torch.zeros(self.diameter**2, device=kernel.device, dtype=kernel.dtype)
                base[self.diameter**2 // 2] = 1.0
                base = base.view(1, -1, 1, 1)
            kernel = base + self.gate.to(kernel.dtype) * (kernel - base)
        if correction is not None:
            kernel = kernel + correction
        return kernel

    def kernel_correction(self, kernel: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The learned additive correction of ``kernel`` (B, K*K, H, W) for this guidance."""
        correction = self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        if not self.constrained_fixup:
            return correction
        # Unconstrained, the correction can grow each stage's gain until training diverges, and a 1x1 MLP
        # that mixes taps is not flip-equivariant. So: bounded (tanh), averaged with its conjugate by the
        # left-right tap mirror (the guidance channels are mirror-invariant, see GuidanceEncoder), and
        # zero-sum over the taps, so the kernel still sums to 1 (constants are kept) while taps may go
        # negative.
        mirror = _mirrored_taps(self.diameter, kernel.device)
        mirrored = self.fixup_proj(torch.cat([kernel[:, mirror], guidance], dim=1))[:, mirror]
        correction = 0.5 * (torch.tanh(correction) + torch.tanh(mirrored))
        return correction - correction.mean(1, keepdim=True)

    def forward(
        self,
        source: torch.Tensor,
        guidance: torch.Tensor,
        *,
        image: torch.Tensor | None = None,
        fused: bool = True,
        source_padding: Sequence[int] | None = None,
        out_padding: Sequence[int] | None = None,
        cell_means: Sequence[int] | None = None,
        back_project_to: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Apply this stage; ``fused=False`` runs the plain path (:meth:`kernel_plain`, :func:`apply_kernel`).
        ``image``: the RGB image at the guidance's size (needed with ``base_kernel="classic"``).
        ``cell_means``: return ``(output, its cell means or None)`` (see :func:`apply_kernel_fused`).
        ``back_project_to``: return the output back-projected onto these low-res features (bicubic
        :func:`~featup.core.consistency.back_project`; fused into the op where it can, see
        :func:`apply_kernel_fused`).

        The kernels are computed in the parameters' precision even under autocast (the squared distances
        cancel, and their rounding error is multiplied by the range temperature); only the adaptive
        convolution over the features follows autocast.
        """
        with _without_autocast(guidance.device):
            guidance = _to_param_precision(guidance, self.range_temp)
            if image is not None:
                image = _to_param_precision(image, self.range_temp)
            if fused and has_jbu_stage_filters(guidance.device) and self.kernel_op_applies(guidance):
                kernel = _DeferredKernel(self, guidance, image)  # computed by apply_kernel_fused's plan
            else:
                kernel = self.kernel(guidance, image) if fused else self.kernel_plain(guidance, image)
        if not fused:
            out = apply_kernel(
                source, kernel, self.radius, resize_mode=self.resize_mode, pad_mode=self.pad_mode
            )
            if back_project_to is not None:
                return back_project(out, back_project_to)
            return out if cell_means is None else (out, None)
        return apply_kernel_fused(
            source,
            kernel,
            self.radius,
            resize_mode=self.resize_mode,
            pad_mode=self.pad_mode,
            source_padding=source_padding,
            out_padding=out_padding,
            cell_means=cell_means,
            back_project_to=back_project_to,
        )

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, key_dim={self.key_dim}, resize_mode={self.resize_mode!r}, "
            f"range_kernel={self.range_kernel!r}, safe_start={self.safe_start}, base_kernel={self.base_kernel!r}"
        )


class JBUStack(Upsampler, CheckpointMixin):
    """FeatUp's JBU upsampler: learned JBU stages, 2x each, the last one landing on the exact output size.

    Stage ``k`` uses the parameters of ``up{min(k + 1, n_stages)}``: a ratio needing fewer stages uses the
    first ones (whose resolutions match those they were trained at for 16x), a larger one reuses the last.

    Args:
        feat_dim: feature channels. ``None`` (default): no per-feature parameters, any channel count works
            (encoder-agnostic) and the output is linear in the features. An int adds a residual 1x1
            projection ``x + s * conv(x)`` (zero-initialized, s = 1; the original's s = 0.1) and requires
            features with exactly that many channels.
        radius: neighborhood radius of each stage (K = 2 * radius + 1).
        key_dim: width of the range MLP.
        n_stages: number of distinct parameter sets ``up1 .. up{n_stages}``.
        dropout: Dropout2d rate in the range MLP (training only).
        resize_mode: source resampling per stage: "bicubic" (default, as the original code: four bilinear
            2x rounds blur more) or "bilinear" (the paper's wording).
        pad_mode: border handling ("reflect" or "replicate").
        normalize_guidance: ImageNet-normalize the [0, 1] image before it guides (the original models were
            trained that way).
        init_sigma_spatial: initial spatial width on window coordinates in [-1, 1] (1.0: the whole window,
            as the original; the distance range kernel needs a wide start).
        variant: the layout: ``"default"`` (a distance range kernel ``softmax(-t |k_p - k_q|^2)`` on keys
            from a mirror-symmetric :class:`~featup.core.guidance.GuidanceEncoder`, plus a bounded,
            flip-equivariant, zero-sum kernel correction per stage), ``"paper"`` (eq. 4-6: the inner-product
            range kernel on a 1x1 MLP of the pooled image, no correction) or ``"original"`` (the original
            project's layout, see :mod:`featup.core.original`: the paper's kernel plus its unconstrained
            correction, bicubic resize, reflect padding, ImageNet-normalized guidance, sigma init 1 and a
            residual final 1x1 conv scaled by 0.1 behind Dropout2d(0.2); needs ``feat_dim`` and the default
            ``radius``, ``key_dim``, ``n_stages``, and overrides the other options). A mapping of
            ``range_kernel`` / ``guidance_encoder`` / ``kernel_fixup`` / ``constrained_fixup`` on top of
            the default layout builds a custom one (ablations, and configs saved before the variants).
        safe_start: start as a sound fixed upsampler: every stage's bilateral kernel is gated by a
            zero-initialised scalar and its correction's output layer is zero-initialised, so a fresh stack is
            exactly ``base_kernel``'s fixed upsampler and training can only add to it (see :class:`JBUStage`).
            None: the variant's choice (on for "default", off for "paper" and "original").
        base_kernel: the fixed upsampler of the safe start: ``"classic"`` (default) Kopf's joint bilateral
            upsampling (``create_upsampler("jbu_classic")``, fixed RGB range and spatial Gaussians), or
            ``"delta"`` the chain of 2x ``resize_mode`` resizes (stacks saved before this option).
        consistency: end with :func:`featup.core.consistency.back_project`: the output's cell means are
            replaced by the input features', so it average-pools back to them exactly and stays in the
            backbone's feature space; skipped for outputs smaller than the input. None: the variant's choice
            (on for "default", off for "paper" and "original"; stacks saved before this option load without).
        consistency_strength: how far the back-projection moves the output, ``a`` in [0, 1]: the output is
            ``pre + a (back_project(pre) - pre)`` (1: exact cell means, the default; 0: the stack without the
            step). Lower values trade pooled-back agreement for CAM faithfulness (docs/decisions.md#cam-215).
        range_kernel, guidance_encoder, kernel_fixup, constrained_fixup, original: deprecated layout flags;
            still accepted (with a DeprecationWarning naming the ``variant`` to use) and still recorded by
            :meth:`config`, so every saved config loads as it was saved.

    Raises:
        ValueError, TypeError: an option out of range or unknown, naming it.

    Shape:
        - lr_feats: (B, C, h, w)
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, C, H', W'), (H', W') = output_size or (H, W); any ratio, odd and non-square sizes
    """

    def __init__(
        self,
        feat_dim: int | None = None,
        *,
        radius: int = 3,
        key_dim: int = 32,
        n_stages: int = 4,
        dropout: float = 0.1,
        resize_mode: str = "bicubic",
        pad_mode: str = "reflect",
        normalize_guidance: bool = False,
        init_sigma_spatial: float = 1.0,
        variant: str | Mapping[str, Any] = "default",
        safe_start: bool | None = None,
        base_kernel: str = "classic",
        consistency: bool | None = None,
        consistency_strength: float = 1.0,
        **layout_flags: Any,
    ) -> None:
        super().__init__()
        if feat_dim is not None and (not isinstance(feat_dim, int) or feat_dim < 1):
            raise ValueError(f"expected feat_dim as a positive int or None, got {feat_dim!r}")
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"expected radius as a non-negative int, got {radius!r}")
        if not isinstance(key_dim, int) or key_dim < 1:
            raise ValueError(f"expected key_dim as a positive int, got {key_dim!r}")
        if not isinstance(n_stages, int) or n_stages < 1:
            raise ValueError(f"expected n_stages as a positive int, got {n_stages!r}")
        if resize_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"expected resize_mode 'bilinear' or 'bicubic', got {resize_mode!r}")
        if pad_mode not in ("reflect", "replicate"):
            raise ValueError(f"expected pad_mode 'reflect' or 'replicate', got {pad_mode!r}")
        layout, original, defaults = _resolve_variant(variant, layout_flags)
        if safe_start is None:
            safe_start = _SAFE_START[defaults]
        if consistency is None:  # on unless the layout is the paper's or the original's
            consistency = _variant_name(layout, original) not in ("paper", "original")
        if base_kernel not in BASE_KERNELS:
            raise ValueError(f"expected base_kernel in {BASE_KERNELS}, got {base_kernel!r}")
        if not isinstance(consistency, bool):
            raise TypeError(f"expected consistency as True, False or None, got {consistency!r}")
        if isinstance(consistency_strength, bool) or not isinstance(consistency_strength, (int, float)):
            raise TypeError(f"expected consistency_strength as a number, got {consistency_strength!r}")
        if not 0.0 <= consistency_strength <= 1.0:
            raise ValueError(f"expected consistency_strength in [0, 1], got {consistency_strength!r}")
        if layout_flags:
            _deprecated_flags(
                layout_flags, _variant_name(layout, original) or _custom(layout), bool(safe_start)
            )
        range_kernel, guidance_encoder = layout["range_kernel"], layout["guidance_encoder"]
        kernel_fixup, constrained_fixup = layout["kernel_fixup"], layout["constrained_fixup"]
        if original:
            if feat_dim is None:
                raise ValueError("variant 'original' has a final dim x dim conv: expected feat_dim, got None")
            if (radius, key_dim, n_stages) != (3, 32, 4):
                raise ValueError(
                    "variant 'original' fixes radius=3, key_dim=32, n_stages=4; "
                    f"got radius={radius}, key_dim={key_dim}, n_stages={n_stages}"
                )
            resize_mode, pad_mode, normalize_guidance, dropout = "bicubic", "reflect", True, 0.1
            init_sigma_spatial, safe_start, consistency = 1.0, False, False
        self.feat_dim = feat_dim
        self.radius = radius
        self.key_dim = key_dim
        self.n_stages = n_stages
        self.dropout = float(dropout)
        self.kernel_fixup = kernel_fixup
        self.constrained_fixup = bool(kernel_fixup and constrained_fixup)
        self.resize_mode = resize_mode
        self.pad_mode = pad_mode
        self.normalize_guidance = normalize_guidance
        self.init_sigma_spatial = float(init_sigma_spatial)
        self.range_kernel = range_kernel
        self.safe_start = bool(safe_start)
        self.base_kernel = base_kernel if self.safe_start else "delta"
        self.consistency = consistency
        self.consistency_strength = float(consistency_strength)
        self.original = original
        self.encoder: GuidanceEncoder | None = GuidanceEncoder(3, key_dim) if guidance_encoder else None
        for k in range(1, n_stages + 1):
            stage = JBUStage(
                radius,
                key_dim,
                key_dim if guidance_encoder else 3,
                range_kernel=range_kernel,
                dropout=dropout,
                kernel_fixup=kernel_fixup,
                constrained_fixup=self.constrained_fixup,
                resize_mode=resize_mode,
                pad_mode=pad_mode,
                init_sigma_spatial=init_sigma_spatial,
                safe_start=self.safe_start,
                base_kernel=self.base_kernel,
            )
            self.add_module(f"up{k}", stage)
        self.proj_scale = 0.1 if original else 1.0
        self.fixup_proj: nn.Sequential | None = None
        if feat_dim is not None:
            self.fixup_proj = nn.Sequential(
                nn.Dropout2d(0.2 if original else 0.0), nn.Conv2d(feat_dim, feat_dim, 1)
            )
            if not original:
                # start as the identity so a fresh stack is a pure JBU; training learns the correction
                nn.init.zeros_(self.fixup_proj[1].weight)
                nn.init.zeros_(self.fixup_proj[1].bias)
        #: run the fused stages (default); False runs the plain path, the reference the fused one is tested
        #: against (not a hyperparameter: not saved in the config)
        self.fused = True
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def stages(self) -> list[JBUStage]:
        """The distinct stages ``up1 .. up{n_stages}``."""
        return [getattr(self, f"up{k}") for k in range(1, self.n_stages + 1)]

    def config(self) -> dict[str, Any]:
        return {
            "feat_dim": self.feat_dim,
            "radius": self.radius,
            "key_dim": self.key_dim,
            "n_stages": self.n_stages,
            "dropout": self.dropout,
            "kernel_fixup": self.kernel_fixup,
            "constrained_fixup": self.constrained_fixup,
            "resize_mode": self.resize_mode,
            "pad_mode": self.pad_mode,
            "normalize_guidance": self.normalize_guidance,
            "init_sigma_spatial": self.init_sigma_spatial,
            "range_kernel": self.range_kernel,
            "guidance_encoder": self.encoder is not None,
            "safe_start": self.safe_start,
            "base_kernel": self.base_kernel,
            "consistency": self.consistency,
            "consistency_strength": self.consistency_strength,
            "original": self.original,
        }

    @property
    def variant(self) -> str | dict[str, Any]:
        """The layout as ``variant=`` takes it: the variant's name, or a custom layout's departures from
        the default one."""
        layout = {
            "range_kernel": self.range_kernel,
            "guidance_encoder": self.encoder is not None,
            "kernel_fixup": self.kernel_fixup,
            "constrained_fixup": self.constrained_fixup,
        }
        return _variant_name(layout, self.original) or _custom(layout)

    #: constructor values of options added later, for configs saved before them (the paper's layout)
    LEGACY_KWARGS: dict[str, Any] = {
        "range_kernel": "dot",
        "guidance_encoder": False,
        "constrained_fixup": False,
        "safe_start": False,
        "base_kernel": "delta",
        "consistency": False,
        "consistency_strength": 1.0,
    }

    @classmethod
    def kwargs_from_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from a saved :meth:`config`: the layout flags it records become ``variant=``
        (so loading warns about nothing), and options it predates get the values it was saved with."""
        if "variant" in kwargs:  # constructor kwargs already
            return dict(kwargs)
        kwargs = {**cls.LEGACY_KWARGS, **kwargs}
        flags = {k: kwargs.pop(k) for k in _LAYOUT_FLAGS if k in kwargs}
        layout, original, _ = _resolve_variant("default", flags)
        kwargs["variant"] = _variant_name(layout, original) or _custom(layout)
        return kwargs

    def guidance(self, image: torch.Tensor) -> torch.Tensor:
        """The full-resolution guidance the stages pool from: the (ImageNet-normalized if configured) image,
        or its guidance-encoder features.

        Shape:
            - image: (B, 3, H, W)
            - output: (B, 3 or key_dim, H, W)
        """
        image = image.to(self.up1.range_temp.dtype)
        if self.normalize_guidance:
            image = (image - self._mean.to(image.dtype)) / self._std.to(image.dtype)
        if self.encoder is None:
            return image
        return _pointwise_mlp(self.encoder, image) if self.fused else self.encoder(image)

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if self.feat_dim is not None and lr_feats.shape[1] != self.feat_dim:
            raise ValueError(
                f"expected lr_feats with {self.feat_dim} channels (feat_dim), got {tuple(lr_feats.shape)}"
            )
        assert image is not None  # guided: the base class rejects image=None
        with _without_autocast(image.device):  # the key path in the parameters' precision (see JBUStage)
            guidance = self.guidance(image)
        x = lr_feats
        stages = self.stages
        sizes = stage_sizes(lr_feats.shape[-2:], size)
        rgb = image.to(guidance.dtype) if self.base_kernel == "classic" else None
        padding = None  # zero margins around x, written by the previous fused stage for this one
        (lr_h, lr_w), projected = lr_feats.shape[-2:], False
        back_projects = self.consistency and size[0] >= lr_h and size[1] >= lr_w
        strength = self.consistency_strength
        pool_cells = None  # the last stage back-projects fully only; a partial step runs after it
        if (
            back_projects
            and strength == 1.0
            and self.fixup_proj is None
            and size[0] % lr_h == 0
            and size[1] % lr_w == 0
        ):
            pool_cells = (size[0] // lr_h, size[1] // lr_w)
        pooled = _pooled_guidances(guidance, sizes) if self.fused else {}
        pooled_rgb = _pooled_guidances(rgb, sizes) if self.fused and rgb is not None else {}
        for k, stage_size in enumerate(sizes):
            stage = stages[min(k, len(stages) - 1)]
            if not self.fused:
                stage_rgb = None if rgb is None else pool_guidance(rgb, stage_size)
                x = stage(x, pool_guidance(guidance, stage_size), image=stage_rgb, fused=False)
                continue
            stage_rgb = pooled_rgb.get(tuple(stage_size))
            next_padding = None
            if k + 1 < len(sizes):
                following = stages[min(k + 1, len(stages) - 1)]
                geometry = _fused_geometry(
                    *stage_size, *sizes[k + 1], following.radius, following.resize_mode,
                    following.pad_mode, guidance.dtype,
                )  # fmt: skip
                next_padding = None if geometry is None else geometry[-1]
            # the last stage also back-projects (the correction added as it writes the output, where the
            # ops can; else it pools the cell means the back-projection needs as it writes)
            last = k + 1 == len(sizes) and pool_cells is not None
            x = stage(
                x,
                pooled[tuple(stage_size)],
                image=stage_rgb,
                source_padding=padding,
                out_padding=next_padding,
                back_project_to=lr_feats if last else None,
            )
            projected = projected or last
            padding = next_padding
        if self.fixup_proj is not None:
            conv_dtype = self.fixup_proj[1].weight.dtype
            x = x + self.proj_scale * self.fixup_proj(x.to(conv_dtype)).to(x.dtype)
        if back_projects and not projected:
            if strength < 1.0:
                return torch.lerp(x, back_project(x, lr_feats), strength)
            inplace = not (torch.is_grad_enabled() and x.requires_grad)
            x = back_project(x, lr_feats, inplace=inplace)
        return x

    @classmethod
    def from_original(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, Any],
        map_location: str | torch.device = "cpu",
    ) -> JBUStack:
        """Load a JBU stack published by the original FeatUp project (eval mode).

        Accepts the Lightning ``.ckpt`` file (read with ``torch.load(weights_only=True)``), a ``.safetensors``
        file, the checkpoint dict, or its ``state_dict``, with or without the ``upsampler.`` prefix. The
        feature dimension is read from the weights. Features from ``use_norm`` checkpoints must go through
        :func:`featup.core.original.channel_norm` first, as the original models did.

        Raises:
            CheckpointError: unreadable file, missing/unexpected keys or wrong shapes.
        """
        from featup.core.original import read_original_jbu

        state, feat_dim = read_original_jbu(path_or_state_dict)
        module = cls(feat_dim, variant="original")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # pragma: no cover - read_original_jbu validates keys and shapes first
            raise CheckpointError(f"original JBU weights do not match the original layout: {exc}") from None
        return module.to(map_location).eval()


# Named variants, as timm names model configurations; the flags that remain are real hyperparameters.
register_upsampler("jbu")(JBUStack)


@register_upsampler("jbu_paper")
def jbu_paper(**kwargs: Any) -> JBUStack:
    """``JBUStack(variant="paper")``: the paper's equations (eq. 4-6), starting from the bilateral kernels."""
    return JBUStack(**{"variant": "paper", **kwargs})


@register_upsampler("jbu_original")
def jbu_original(feat_dim: int | None = None, **kwargs: Any) -> JBUStack:
    """``JBUStack(feat_dim, variant="original")``: the original FeatUp code's layout (needs ``feat_dim``)."""
    return JBUStack(feat_dim, **{"variant": "original", **kwargs})
