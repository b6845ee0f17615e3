"""Synthetic scenes with per-pixel labels and feature extractors whose ideal high-res features are known.

Pretrained weights and the paper's datasets cannot be fetched on machines without network, so quality is
measured here on procedurally generated scenes:

- **Scenes** (:func:`make_scenes`): seeded images of objects with varied shapes and sizes (ellipses,
  rotated rectangles, polygons, wobbly blobs, thin bars), each labelled per pixel. An object's class is
  carried by its *texture* (stripe orientation and period, checkers), which only a neighbourhood of pixels
  reveals; colors are drawn independently of the class, so no single pixel gives the class away and an
  upsampler cannot read the class off the guidance image. Thin "wire" structures a few pixels wide are a
  class of their own.
- **Feature extractors** (:class:`SyntheticExtractor`): deterministic functions of the pixels alone (so
  jittered views are consistent), built from a fixed filter bank (oriented quadrature filters, local color,
  context pooled over a large window) followed by a fixed random MLP and a channel LayerNorm. They are
  translation-equivariant at stride 1; the low-resolution output is that stride-1 map average-pooled by
  ``stride`` (14 or 16), exactly how a patch encoder summarises a patch. The stride-1 map is therefore the
  ground truth an ideal upsampler recovers: the one high-res map consistent with every translated view.

Two extractors with different filters, widths and strides (``"a"``: 32 channels, stride 14; ``"b"``:
48 channels, stride 16) let the encoder-agnostic transfer of one JBU stack be measured.

Example:
    >>> train = synthetic_split("train", 8, size=(112, 112))
    >>> ext = SyntheticExtractor("a")
    >>> ext(train.images).shape, ext.dense(train.images).shape
    (torch.Size([8, 32, 8, 8]), torch.Size([8, 32, 112, 112]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASS_NAMES",
    "EXTRACTOR_STRIDES",
    "SceneConfig",
    "SyntheticExtractor",
    "SyntheticSplit",
    "make_scene",
    "make_scenes",
    "synthetic_split",
]

#: class 0 is the background; classes 1-4 are textured objects; class 5 thin wires
CLASS_NAMES: tuple[str, ...] = (
    "background",
    "stripes_0deg",
    "stripes_90deg",
    "stripes_45deg",
    "checker",
    "wire",
)

# (angle in degrees, period in px) of the stripe classes; the checker uses two orientations
_STRIPES = {1: (0.0, 6.0), 2: (90.0, 6.0), 3: (45.0, 9.0)}
_CHECKER_PERIOD = 8.0

# seed offsets keep the splits disjoint for any number of scenes below 10**6
_SPLIT_OFFSET = {"train": 0, "eval": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    Attributes:
        size: (H, W) of each image in pixels.
        n_objects: inclusive range of textured objects per scene.
        n_wires: inclusive range of thin structures per scene.
        min_radius: smallest object half-extent as a fraction of min(H, W).
        max_radius: largest object half-extent as a fraction of min(H, W).
    """

    size: tuple[int, int] = (112, 112)
    n_objects: tuple[int, int] = (3, 7)
    n_wires: tuple[int, int] = (0, 2)
    min_radius: float = 0.06
    max_radius: float = 0.25


@dataclass(frozen=True)
class SyntheticSplit:
    """A split of scenes.

    Attributes:
        images: (N, 3, H, W) float32 RGB in [0, 1].
        labels: (N, H, W) int64 class indices into :data:`CLASS_NAMES`.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _distinct_color(rng: np.random.Generator, avoid: np.ndarray, min_dist: float = 0.25) -> np.ndarray:
    """A random color at least ``min_dist`` (RGB Euclidean) from ``avoid``; visible but class-agnostic."""
    for _ in range(32):
        c = _random_color(rng)
        if np.linalg.norm(c - avoid) >= min_dist:
            return c
    return 1.0 - avoid


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cfg: SceneConfig) -> np.ndarray:
    """Boolean mask of one random shape (ellipse, rotated rectangle, polygon or blob)."""
    h, w = yy.shape
    s = min(h, w)
    cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    r = rng.uniform(cfg.min_radius, cfg.max_radius) * s
    theta = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    kind = rng.integers(4)
    if kind == 0:  # ellipse
        aspect = rng.uniform(0.4, 1.0)
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    if kind == 1:  # rotated rectangle
        aspect = rng.uniform(0.3, 1.0)
        return (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
    if kind == 2:  # convex polygon: intersection of half-planes tangent to a circle
        n = int(rng.integers(3, 7))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        mask = np.ones_like(yy, dtype=bool)
        for a in angles:
            mask &= dx * math.cos(a) + dy * math.sin(a) <= r * rng.uniform(0.6, 1.0)
        return mask
    # blob: radius modulated by a few random harmonics of the polar angle
    phi = np.arctan2(dy, dx)
    radius = np.full_like(phi, r)
    for k in range(2, 5):
        radius += r * rng.uniform(0.0, 0.18) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return np.hypot(dy, dx) <= radius


def _texture(rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Class texture as a [0, 1] blend weight between two random colors."""
    phase = rng.uniform(0, 2 * math.pi)
    if cls in _STRIPES:
        angle, period = _STRIPES[cls]
        angle = math.radians(angle + rng.uniform(-8, 8))  # some in-class variation
        period *= rng.uniform(0.9, 1.1)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        wave = np.sin(2 * math.pi * t / period + phase)
    elif cls == 4:
        period = _CHECKER_PERIOD * rng.uniform(0.9, 1.1)
        angle = rng.uniform(0, math.pi / 2)
        t1 = xx * math.cos(angle) + yy * math.sin(angle)
        t2 = -xx * math.sin(angle) + yy * math.cos(angle)
        wave = np.sin(2 * math.pi * t1 / period + phase) * np.sin(2 * math.pi * t2 / period)
        wave = wave * 2.0
    else:
        raise ValueError(f"expected a textured class in 1..4, got {cls}")
    return 1.0 / (1.0 + np.exp(-4.0 * wave))  # soft square wave: edges a few pixels wide, like real textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid bilinearly enlarged."""
    grid = torch.from_numpy(rng.uniform(-1, 1, size=(1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()


def make_scene(seed: int, cfg: SceneConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one scene.

    Args:
        seed: any non-negative int; the same seed always gives the same scene.
        cfg: scene parameters (default :class:`SceneConfig`).

    Returns:
        ``(image, labels)``.

    Shape:
        - image: (3, H, W) float32 RGB in [0, 1]
        - labels: (H, W) int64 in ``range(len(CLASS_NAMES))``
    """
    cfg = cfg or SceneConfig()
    h, w = (int(s) for s in cfg.size)
    if h < 16 or w < 16:
        raise ValueError(f"expected a scene size of at least 16x16, got {cfg.size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)

    # background: a random color with smooth illumination changes and isotropic fine noise (no orientation)
    bg = _random_color(rng)
    shade = 0.15 * _smooth_noise(rng, h, w, 4)
    image = np.clip(bg[:, None, None] + shade[None] + rng.normal(0, 0.03, size=(3, h, w)), 0, 1)
    labels = np.zeros((h, w), dtype=np.int64)

    for _ in range(int(rng.integers(cfg.n_objects[0], cfg.n_objects[1] + 1))):
        cls = int(rng.integers(1, 5))
        mask = _shape_mask(rng, yy, xx, cfg)
        c1 = _distinct_color(rng, bg)
        c2 = _distinct_color(rng, c1, min_dist=0.35)
        t = _texture(rng, cls, yy, xx)
        tex = c1[:, None, None] * t[None] + c2[:, None, None] * (1 - t[None])
        image = np.where(mask[None], tex, image)
        labels[mask] = cls

    for _ in range(int(rng.integers(cfg.n_wires[0], cfg.n_wires[1] + 1))):
        # a thin straight or gently curved bar crossing much of the image
        width = rng.uniform(1.5, 3.5)
        angle = rng.uniform(0, math.pi)
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        d = (xx - cx) * -math.sin(angle) + (yy - cy) * math.cos(angle)
        along = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        d = d - rng.uniform(-0.004, 0.004) * along**2
        half_len = rng.uniform(0.3, 0.7) * max(h, w)
        mask = (np.abs(d) <= width / 2) & (np.abs(along) <= half_len)
        color = _distinct_color(rng, bg, min_dist=0.4)
        image = np.where(mask[None], color[:, None, None], image)
        labels[mask] = 5

    return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(labels)


def make_scenes(n: int, cfg: SceneConfig | None = None, seed: int = 0) -> SyntheticSplit:
    """Draw ``n`` scenes with seeds ``seed, seed+1, ...``.

    Shape:
        - images: (n, 3, H, W); labels: (n, H, W)
    """
    if n < 1:
        raise ValueError(f"expected at least one scene, got n={n}")
    pairs = [make_scene(seed + i, cfg) for i in range(n)]
    return SyntheticSplit(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


def synthetic_split(split: str, n: int, size: Sequence[int] = (112, 112), seed: int = 0) -> SyntheticSplit:
    """A named split (``"train"``, ``"eval"`` or ``"test"``); splits never share a scene.

    Shape:
        - images: (n, 3, *size); labels: (n, *size)
    """
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"expected split 'train', 'eval' or 'test', got {split!r}")
    cfg = SceneConfig(size=(int(size[0]), int(size[1])))
    return make_scenes(n, cfg, seed=seed * 7_000_001 + _SPLIT_OFFSET[split])


# ----------------------------------------------------------------------------------------------- extractors


def _gaussian_1d(sigma: float, order: int = 0, half: int | None = None) -> torch.Tensor:
    """Sampled 1-D Gaussian (order 0, sums to 1) or its derivative of ``order`` 1-3."""
    half = half if half is not None else max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    s2 = sigma**2
    factor = {0: 1.0, 1: -x / s2, 2: (x**2 - s2) / s2**2, 3: -(x**3 - 3 * x * s2) / s2**3}[order]
    return (g * factor).float()


def _sep_conv(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Separable per-channel convolution, replicate-padded: kx along W, then ky along H. Same size out."""
    c = x.shape[1]
    hx, hy = kx.numel() // 2, ky.numel() // 2
    x = F.conv2d(
        F.pad(x, (hx, hx, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c
    )
    return F.conv2d(
        F.pad(x, (0, 0, hy, hy), mode="replicate"), ky.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )


def _pad_kernel(k: torch.Tensor, half: int) -> torch.Tensor:
    extra = half - k.numel() // 2
    return F.pad(k, (extra, extra))


def _bank_conv(image: torch.Tensor, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Separable filters ``xs[i] (x) ys[i]`` applied to every color channel in two grouped convolutions.

    Returns (B, C * n, H, W) ordered channel-major (all filters of channel 0 first). Replicate-padded.
    """
    b, c, h, w = image.shape
    n = len(xs)
    half = max(max(k.numel() for k in xs), max(k.numel() for k in ys)) // 2
    kx = torch.stack([_pad_kernel(k, half) for k in xs]).to(image)  # (n, k)
    ky = torch.stack([_pad_kernel(k, half) for k in ys]).to(image)
    x = F.pad(image, (half, half, 0, 0), mode="replicate")
    x = F.conv2d(x, kx.repeat(c, 1).view(c * n, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, half, half), mode="replicate")
    return F.conv2d(x, ky.repeat(c, 1).view(c * n, 1, -1, 1), groups=c * n)


def _gabor_energies(image: torch.Tensor, specs: Sequence[tuple[float, float]]) -> torch.Tensor:
    """Quadrature (complex Gabor) energy per (angle, period), summed over the color channels: (B, n, H, W).

    A complex Gabor with an isotropic envelope factorises into x and y parts, so the whole bank is four
    separable real filters per (angle, period).
    """
    xs, ys = [], []
    for angle, period in specs:
        a, sigma = math.radians(angle), 0.45 * period
        half = int(math.ceil(2.5 * sigma))
        x = torch.arange(-half, half + 1, dtype=torch.float64)
        env = torch.exp(-(x**2) / (2 * sigma**2))
        env = env / env.sum()
        k = 2 * math.pi / period
        cx, sx = (
            (env * torch.cos(k * math.cos(a) * x)).float(),
            (env * torch.sin(k * math.cos(a) * x)).float(),
        )
        cy, sy = (
            (env * torch.cos(k * math.sin(a) * x)).float(),
            (env * torch.sin(k * math.sin(a) * x)).float(),
        )
        xs += [cx, sx, sx, cx]
        ys += [cy, sy, cy, sy]
    r = _bank_conv(image, xs, ys).unflatten(1, (image.shape[1], len(specs), 4))  # (B, C, n, 4, H, W)
    real = r[:, :, :, 0] - r[:, :, :, 1]
    imag = r[:, :, :, 2] + r[:, :, :, 3]
    return (real.pow(2) + imag.pow(2)).sum(1).add(1e-6).sqrt()


def _derivative_energies(
    image: torch.Tensor, scales: Sequence[float], angles: Sequence[float]
) -> torch.Tensor:
    """Steered second-derivative-of-Gaussian energies and gradient magnitude per scale: (B, n, H, W)."""
    xs, ys = [], []
    for sigma in scales:
        half = int(math.ceil(3 * sigma))
        g0, g1, g2 = (_gaussian_1d(sigma, o, half) for o in (0, 1, 2))
        xs += [g2, g0, g1, g1, g0]  # Ixx, Iyy, Ixy, Ix, Iy
        ys += [g0, g2, g1, g0, g1]
    r = _bank_conv(image, xs, ys).unflatten(1, (image.shape[1], len(scales), 5))
    out = []
    for i, sigma in enumerate(scales):
        ixx, iyy, ixy, ix, iy = r[:, :, i].unbind(2)
        # scale-normalised (sigma^2 for second derivatives, sigma for first) so scales compare
        for angle in angles:
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            steered = (c * c * ixx + 2 * c * s * ixy + s * s * iyy) * sigma**2
            out.append(steered.pow(2).sum(1, keepdim=True))
        out.append((ix.pow(2) + iy.pow(2)).sum(1, keepdim=True) * sigma**2)
    return torch.cat(out, 1).add(1e-6).sqrt()


@dataclass(frozen=True)
class _Variant:
    kind: str
    specs: tuple[tuple[float, float], ...]
    feat_dim: int
    stride: int
    pool_sigma: float
    context_sigma: float
    hidden: int
    seed: int


_VARIANTS = {
    "a": _Variant(
        kind="gabor",
        specs=tuple((a, p) for p in (6.0, 9.0) for a in (0.0, 45.0, 90.0, 135.0)),
        feat_dim=32,
        stride=14,
        pool_sigma=1.5,
        context_sigma=6.0,
        hidden=96,
        seed=1234,
    ),
    "b": _Variant(
        kind="derivative",
        specs=tuple((a, s) for s in (1.2, 2.2) for a in (0.0, 60.0, 120.0)),
        feat_dim=48,
        stride=16,
        pool_sigma=2.0,
        context_sigma=8.0,
        hidden=128,
        seed=98765,
    ),
}


#: the stride of each extractor variant (a scene must be a multiple of it for the cells to tile the scene)
EXTRACTOR_STRIDES: dict[str, int] = {name: v.stride for name, v in _VARIANTS.items()}


class SyntheticExtractor(nn.Module):
    """A fixed, deterministic feature extractor for synthetic scenes, usable as a FeatUp backbone.

    ``dense(image)`` is the stride-1 feature map: oriented filter energies summed over the color channels
    (pooled with a small Gaussian), local color and contrast, and the same energies pooled over a large window
    (context), passed through a fixed random two-layer MLP (1x1 convs), centred on fixed reference scenes,
    and LayerNormed over channels. ``forward(image)`` average-pools that map by ``stride``: ``forward`` is
    what a patch encoder would output and ``dense`` is the ground truth an ideal upsampler recovers. Borders
    are replicate-padded; away from them the map is translation-equivariant.

    Args:
        variant: ``"a"`` (Gabor filters, 32 channels, stride 14) or ``"b"`` (Gaussian-derivative filters,
            48 channels, stride 16).
        stride: override the variant's stride (any int >= 1).

    Attributes:
        feat_dim: channels C. stride: the pooling stride. mean, std: (3,) tensors; the extractor reads
        [0, 1] images as they are (mean 0, std 1), which is part of the backbone contract.

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - forward: (B, C, H // stride, W // stride)
        - dense: (B, C, H, W)
    """

    def __init__(self, variant: str = "a", *, stride: int | None = None) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"expected synthetic extractor variant 'a' or 'b', got {variant!r}")
        v = _VARIANTS[variant]
        self.variant = variant
        self.feat_dim = v.feat_dim
        self.stride = int(stride if stride is not None else v.stride)
        if self.stride < 1:
            raise ValueError(f"expected stride >= 1, got {self.stride}")
        self.register_buffer("mean", torch.zeros(3), persistent=False)
        self.register_buffer("std", torch.ones(3), persistent=False)
        self._variant = v
        self.register_buffer("pool_kernel", _gaussian_1d(v.pool_sigma), persistent=False)
        self.register_buffer("context_kernel", _gaussian_1d(v.context_sigma), persistent=False)
        if v.kind == "gabor":
            n_energy = len(v.specs)
        else:
            n_energy = len({s for _, s in v.specs}) * (len({a for a, _ in v.specs}) + 1)
        n_in = 2 * n_energy + 3 + 1  # energies, context energies, color, local contrast
        g = torch.Generator().manual_seed(v.seed)
        self.register_buffer(
            "w1", torch.randn(v.hidden, n_in, generator=g) / math.sqrt(n_in), persistent=False
        )
        self.register_buffer("b1", 0.5 * torch.randn(v.hidden, generator=g), persistent=False)
        self.register_buffer(
            "w2", torch.randn(v.feat_dim, v.hidden, generator=g) / math.sqrt(v.hidden), persistent=False
        )
        # inputs are brought to comparable scales before the random MLP, so no cue dominates by accident
        self.register_buffer(
            "in_scale", torch.tensor([6.0] * (2 * n_energy) + [2.0] * 3 + [8.0]), persistent=False
        )
        # Centre the output on fixed reference scenes (as a whitened backbone would be), so cosine similarity
        # measures the varying part of the features rather than a shared offset.
        self.register_buffer("center", torch.zeros(v.feat_dim), persistent=False)
        ref = make_scenes(4, SceneConfig(size=(64, 64)), seed=424242).images
        self.center = self._pre_norm(ref).mean((0, 2, 3))
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, feat_dim={self.feat_dim}, stride={self.stride}"

    @staticmethod
    def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _sep_conv(x, k, k)

    def dense(self, image: torch.Tensor) -> torch.Tensor:
        """The stride-1 feature map (the ground truth of the synthetic benchmark).

        Shape:
            - image: (B, 3, H, W); output: (B, C, H, W)
        """
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"expected image (B,3,H,W) RGB in [0,1], got {shape}")
        out = self._pre_norm(image.float()) - self.center.view(1, -1, 1, 1)
        return F.layer_norm(out.movedim(1, -1), (out.shape[1],)).movedim(-1, 1).contiguous()

    def _pre_norm(self, image: torch.Tensor) -> torch.Tensor:
        v = self._variant
        if v.kind == "gabor":
            energy = _gabor_energies(image, v.specs)
        else:
            energy = _derivative_energies(
                image, sorted({s for _, s in v.specs}), sorted({a for a, _ in v.specs})
            )
        local = self._blur(energy, self.pool_kernel)
        context = self._blur(energy, self.context_kernel)
        color = self._blur(image, self.pool_kernel)
        luma = image.mean(1, keepdim=True)
        contrast = self._blur(luma.pow(2), self.pool_kernel) - self._blur(luma, self.pool_kernel).pow(2)
        x = torch.cat([local, context, color, contrast.clamp_min(0).sqrt()], 1) * self.in_scale.view(
            1, -1, 1, 1
        )
        hidden = F.gelu(torch.einsum("oc,bchw->bohw", self.w1, x) + self.b1.view(1, -1, 1, 1))
        return torch.einsum("oc,bchw->bohw", self.w2, hidden)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Low-resolution features: ``dense(image)`` average-pooled by ``stride``.

        Shape:
            - image: (B, 3, H, W) with H, W >= stride; output: (B, C, H // stride, W // stride)
        """
        if isinstance(image, torch.Tensor) and image.dim() == 4 and min(image.shape[-2:]) < self.stride:
            raise ValueError(
                f"expected an image of at least {self.stride}x{self.stride}, got {tuple(image.shape)}"
            )
        return F.avg_pool2d(self.dense(image), self.stride)
