"""Implicit FeatUp (paper eq. 7): a per-image MLP on Fourier features of pixel coordinates and colours.

``F_hr = MLP(h(e_i : e_j : x, omega))``: for every pixel the coordinates ``(y, x)`` in ``[-1, 1]`` and the
colours ``(r, g, b)`` in ``[0, 1]`` are multiplied by ``n_freqs`` log-spaced frequencies
``exp(linspace(-2, 10))``; their sines and cosines (each with a learned phase) and the raw colours feed a
small MLP (LayerNorm, dropout 0.1, linear, ReLU; 3 layers). The MLP predicts the image's features in the
space of their top ``pca_dim`` principal components; the PCA (fitted on the low-resolution features) is
stored in the module and undone on output, so ``render`` returns features in the backbone's space.

With ``residual=True`` (what :func:`~featup.core.fit_implicit` builds by default) the MLP predicts a residual
over the bicubic upsampling of the PCA-compressed low-resolution features (a buffer), and its last layer
starts at zero: a fresh model renders exactly the bicubic upsampling of the (PCA-truncated) features, so
fitting starts from a safe answer instead of noise. ``residual=False`` is the paper's parameterisation.

The model belongs to one image: that image and the PCA are buffers, so a saved checkpoint is self-contained
and ``ImplicitUpsampler.load(path).render((H, W))`` works on its own. Fit it with
``featup.core.fit_implicit``.

Why it is not in the upsampler registry: ``create_upsampler(name)`` promises a module that upsamples any
``(lr_feats, image)`` pair, whereas an implicit model is fitted to one image and ignores ``lr_feats`` (it only
checks their shape), so a registered, unfitted instance could only return noise. Code that compares
upsamplers should call ``fit_implicit(backbone, image)`` per image and then use the shared call
``imp(lr_feats, image, output_size)`` on the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointMixin
from featup.core.consistency import back_project
from featup.core.pca import PCA

__all__ = ["ImplicitUpsampler", "pixel_coordinates"]


def pixel_coordinates(
    size: tuple[int, int], start: int = 0, stop: int | None = None, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Normalized ``(y, x)`` centres of pixels ``start .. stop-1`` (row-major) of an ``(H, W)`` grid.

    Centres follow ``align_corners=False``: pixel ``i`` of ``H`` sits at ``(2 i + 1) / H - 1``, so the same
    point of the image has the same coordinate at every resolution.

    Shape:
        - output: (stop - start, 2)
    """
    h, w = size
    stop = h * w if stop is None else stop
    idx = torch.arange(start, stop, device=device, dtype=torch.long)
    ys = (2 * torch.div(idx, w, rounding_mode="floor") + 1).to(dtype) / h - 1
    xs = (2 * (idx % w) + 1).to(dtype) / w - 1
    return torch.stack([ys, xs], 1)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for device types autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class _ScaleRows(torch.autograd.Function):
    """``bias + acc * scale`` (``torch.addcmul``) whose backward makes one pass over the gradient for ``acc``
    and one fused row-wise dot product for ``scale`` (addcmul's backward: four full-size passes).

    Shape: bias (D,), acc (N, D), scale (N, 1) -> (N, D).
    """

    @staticmethod
    def forward(ctx, bias, acc, scale):  # type: ignore[override]
        ctx.save_for_backward(acc, scale)
        return torch.addcmul(bias, acc, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        acc, scale = ctx.saved_tensors
        need_bias, need_acc, need_scale = ctx.needs_input_grad
        grad_bias = grad.sum(0) if need_bias else None
        grad_acc = grad * scale if need_acc else None
        grad_scale = torch.bmm(grad.unsqueeze(1), acc.unsqueeze(2)).view(-1, 1) if need_scale else None
        return grad_bias, grad_acc, grad_scale


class ImplicitUpsampler(Upsampler, CheckpointMixin):
    """Per-image implicit feature field (eq. 7), queried at any resolution.

    Args:
        feat_dim: channels ``C`` of the backbone features it reproduces.
        image_size: ``(H, W)`` of the guidance image it is fitted to.
        pca_dim: principal components the MLP predicts (Table 7: 128; clipped to ``feat_dim``).
        hidden_dim: width of the hidden MLP layers.
        n_freqs: Fourier frequencies per input channel.
        n_layers: linear layers of the MLP (Table 7: 3).
        dropout: dropout before every linear layer (Table 7: 0.1).
        dropout_mode: "element" drops single inputs (per pixel and channel); "channel" drops whole input
            channels for the whole image, as the original code's ``Dropout2d`` (folded into the linear
            weights, so it costs nothing, where element dropout costs more than the MLP's matmuls on a CPU).
        log_freq_range: frequencies are ``exp(linspace(*log_freq_range, n_freqs))``.
        residual: predict a residual over ``bicubic(base)`` (zero-initialised last layer); False: eq. 7 as
            in the paper.
        lr_size: ``(h, w)`` of the low-resolution features the base holds (required with ``residual`` or
            ``consistency``).
        consistency: rendered features end with :func:`featup.core.consistency.back_project` against the
            low-resolution features the field was fitted to (:meth:`set_lr`), so they average-pool back to
            them exactly, including the components the PCA dropped. False: the field alone (eq. 7).

    Buffers:
        image (1, 3, H, W), has_image (), base (1, pca_dim, h, w) with ``residual``, lr_feats (1, C, h, w)
        with ``consistency``, and the PCA's (``pca.mean``, ``pca.components`` ...).

    Shape:
        - lr_feats: (1, C, h, w) (checked, otherwise unused: the field is a function of the image only)
        - image: (1, 3, H', W') or None (only sets the default output size)
        - output: (1, C, H'', W'') at ``output_size``, else the image's size, else ``image_size``
    """

    guided = False
    #: evaluate the field on whole pixel grids with :meth:`_grid_field` (the same maths without the
    #: per-pixel encoding); False: always the per-pixel path (the reference it is tested against)
    fast_field = True

    def __init__(
        self,
        feat_dim: int,
        image_size: Sequence[int],
        *,
        pca_dim: int = 128,
        hidden_dim: int = 128,
        n_freqs: int = 30,
        n_layers: int = 3,
        dropout: float = 0.1,
        dropout_mode: str = "element",
        log_freq_range: Sequence[float] = (-2.0, 10.0),
        residual: bool = False,
        lr_size: Sequence[int] | None = None,
        consistency: bool = False,
    ) -> None:
        super().__init__()
        size = tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"expected image_size as positive (H, W), got {image_size!r}")
        for name, value in (("feat_dim", feat_dim), ("pca_dim", pca_dim), ("hidden_dim", hidden_dim)):
            if int(value) < 1:
                raise ValueError(f"expected {name} >= 1, got {value}")
        if int(n_freqs) < 1 or int(n_layers) < 1:
            raise ValueError(f"expected n_freqs >= 1 and n_layers >= 1, got {n_freqs}, {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        lo, hi = (float(v) for v in log_freq_range)
        if dropout_mode not in ("element", "channel"):
            raise ValueError(f"expected dropout_mode 'element' or 'channel', got {dropout_mode!r}")
        self.dropout_mode = dropout_mode
        if not isinstance(residual, bool):
            raise TypeError(f"expected residual as True or False, got {residual!r}")
        if not isinstance(consistency, bool):
            raise TypeError(f"expected consistency as True or False, got {consistency!r}")
        self.consistency = consistency
        if residual or consistency:
            lr_hw = tuple(int(s) for s in lr_size) if lr_size is not None else ()
            if len(lr_hw) != 2 or min(lr_hw) < 1:
                raise ValueError(
                    f"expected lr_size as positive (h, w) with residual or consistency, got {lr_size!r}"
                )
            self.lr_size: tuple[int, int] | None = lr_hw  # type: ignore[assignment]
        else:
            self.lr_size = None
        self.residual = residual
        self.feat_dim = int(feat_dim)
        self.image_size: tuple[int, int] = size  # type: ignore[assignment]
        self.pca_dim = min(int(pca_dim), self.feat_dim)
        self.hidden_dim = int(hidden_dim)
        self.n_freqs = int(n_freqs)
        self.n_layers = int(n_layers)
        self.dropout = float(dropout)
        self.log_freq_range = (lo, hi)

        self.register_buffer("image", torch.zeros(1, 3, *size))
        self.register_buffer("has_image", torch.zeros((), dtype=torch.bool))
        self.register_buffer("freqs", torch.exp(torch.linspace(lo, hi, self.n_freqs)), persistent=False)
        # learned phases of the sines [0] and cosines [1] for each of (y, x, r, g, b) and each frequency
        self.phases = nn.Parameter(torch.randn(2, 5, self.n_freqs))
        self.pca = PCA(self.feat_dim, self.pca_dim)

        in_dim = 2 * 5 * self.n_freqs + 3
        layers: list[nn.Module] = []
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            d_in = in_dim if i == 0 else self.hidden_dim
            d_out = self.pca_dim if last else self.hidden_dim
            layers += [nn.LayerNorm(d_in), nn.Dropout(self.dropout), nn.Linear(d_in, d_out)]
            if not last:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        if self.residual:
            # the residual starts at zero: a fresh model renders bicubic(base) exactly
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
            self.register_buffer("base", torch.zeros(1, self.pca_dim, *self.lr_size))
        if self.consistency:
            self.register_buffer("lr_feats", torch.zeros(1, self.feat_dim, *self.lr_size))
            self.register_buffer("has_lr", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ state
    def config(self) -> dict:
        cfg = {
            "feat_dim": self.feat_dim,
            "image_size": list(self.image_size),
            "pca_dim": self.pca_dim,
            "hidden_dim": self.hidden_dim,
            "n_freqs": self.n_freqs,
            "n_layers": self.n_layers,
            "dropout": self.dropout,
            "log_freq_range": list(self.log_freq_range),
        }
        if self.dropout_mode != "element":
            cfg["dropout_mode"] = self.dropout_mode
        if self.residual:  # configs of the paper's parameterisation stay exactly as they were saved
            cfg.update(residual=True, lr_size=list(self.lr_size))
        if self.consistency:
            cfg.update(consistency=True, lr_size=list(self.lr_size))
        return cfg

    @torch.no_grad()
    def set_image(self, image: torch.Tensor) -> None:
        """Store the guidance image the field is fitted to.

        Shape:
            - image: (1, 3, H, W) RGB in [0, 1] with (H, W) = ``image_size``
        """
        expected = (1, 3, *self.image_size)
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != expected:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"expected image of shape {expected} (RGB in [0,1]), got {got}")
        if not image.is_floating_point():
            raise ValueError(f"expected a floating-point image in [0,1], got dtype {image.dtype}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"expected image values in [0,1], got range [{lo:.3g}, {hi:.3g}]")
        self.image.copy_(image.clamp(0, 1))
        self.has_image.fill_(True)

    @torch.no_grad()
    def set_pca(self, pca: PCA) -> None:
        """Store a fitted PCA of the features (its ``n_components`` must not exceed ``pca_dim``).

        A PCA that kept fewer components (too few samples) is padded with zero components: the extra MLP
        outputs then contribute nothing to the unprojected features.
        """
        if not isinstance(pca, PCA):
            raise TypeError(f"expected a featup.core.PCA, got {type(pca).__name__}")
        if not pca.fitted:
            raise ValueError("expected a fitted PCA: call pca.fit(feats) first")
        if pca.dim_in != self.feat_dim:
            raise ValueError(f"expected a PCA of {self.feat_dim}-channel features, got dim_in={pca.dim_in}")
        k = pca.n_components
        if k > self.pca_dim:
            raise ValueError(f"expected a PCA with at most pca_dim={self.pca_dim} components, got {k}")
        own = self.pca
        own.mean.copy_(pca.mean)
        own.components.zero_()
        own.components[:k].copy_(pca.components)
        own.explained_variance.zero_()
        own.explained_variance[:k].copy_(pca.explained_variance)
        own.total_variance.copy_(pca.total_variance)
        own.n_samples.copy_(pca.n_samples)

    @torch.no_grad()
    def set_base(self, lr_compressed: torch.Tensor) -> None:
        """Store the PCA-compressed low-resolution features the residual model starts from.

        Shape:
            - lr_compressed: (1, k, h, w) with k <= pca_dim (missing components are zero) and (h, w) = lr_size
        """
        if not self.residual:
            raise RuntimeError("set_base needs a residual model (ImplicitUpsampler(..., residual=True))")
        ok = (
            isinstance(lr_compressed, torch.Tensor)
            and lr_compressed.dim() == 4
            and lr_compressed.shape[0] == 1
            and lr_compressed.shape[1] <= self.pca_dim
            and tuple(lr_compressed.shape[-2:]) == self.lr_size
        )
        if not ok:
            got = tuple(lr_compressed.shape) if isinstance(lr_compressed, torch.Tensor) else lr_compressed
            raise ValueError(
                f"expected base features (1, <= {self.pca_dim}, {self.lr_size[0]}, {self.lr_size[1]}), got {got}"
            )
        self.base.zero_()
        self.base[:, : lr_compressed.shape[1]].copy_(lr_compressed)

    @torch.no_grad()
    def set_lr(self, lr_feats: torch.Tensor) -> None:
        """Store the low-resolution features rendered features are made consistent with (``consistency``).

        Shape:
            - lr_feats: (1, C, h, w) with (h, w) = lr_size
        """
        if not self.consistency:
            raise RuntimeError("set_lr needs ImplicitUpsampler(..., consistency=True)")
        expected = (1, self.feat_dim, *self.lr_size)  # type: ignore[misc]
        if not isinstance(lr_feats, torch.Tensor) or tuple(lr_feats.shape) != expected:
            got = tuple(lr_feats.shape) if isinstance(lr_feats, torch.Tensor) else type(lr_feats).__name__
            raise ValueError(f"expected low-res features of shape {expected}, got {got}")
        self.lr_feats.copy_(lr_feats)
        self.has_lr.fill_(True)

    def base_at(self, size: tuple[int, int]) -> torch.Tensor:
        """The bicubic upsampling of ``base`` at ``size`` (equal to ``F.interpolate(..., "bicubic")``).

        Cached while ``base`` is unchanged, as fitting renders the same size every step.

        Shape:
            - output: (1, pca_dim, H, W)
        """
        key = (tuple(size), self.base._version, self.base.data_ptr(), self.phases.dtype, self.base.device)
        cached = getattr(self, "_base_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                full = self._base_rows(tuple(size), 0, size[0]).view(size[0], size[1], self.pca_dim)
                cached = (key, full.permute(2, 0, 1)[None])  # channels-last, like the field's output
            self._base_cache = cached
        return cached[1]

    def _base_rows(self, size: tuple[int, int], row0: int, row1: int) -> torch.Tensor:
        """Rows ``row0 .. row1-1`` of :meth:`base_at` (bicubic resizing is separable), flattened to (n, k)."""
        work = self.phases.dtype
        h, w = self.lr_size  # type: ignore[misc]
        eye_h = torch.eye(h, device=self.base.device, dtype=work)[None, None]
        eye_w = torch.eye(w, device=self.base.device, dtype=work)[None, None]
        ry = F.interpolate(eye_h, size=(size[0], h), mode="bicubic", align_corners=False)[0, 0, row0:row1]
        rx = F.interpolate(eye_w, size=(size[1], w), mode="bicubic", align_corners=False)[0, 0]
        rows = torch.einsum("yh,khw,xw->yxk", ry, self.base[0].to(work), rx)
        return rows.reshape(-1, self.pca_dim)

    # ------------------------------------------------------------------ field
    def encode(self, coords: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """Fourier features of ``(y, x, r, g, b)`` plus the raw colours.

        Shape:
            - coords: (N, 2) normalized (y, x); colors: (N, 3) in [0, 1]
            - output: (N, 10 n_freqs + 3), ordered [sin (5 x n_freqs), cos (5 x n_freqs), r, g, b]
        """
        z = torch.cat([coords, colors], 1)[:, :, None] * self.freqs.to(coords.dtype)  # (N, 5, F)
        phases = self.phases.to(coords.dtype)
        sin = torch.sin(z + phases[0]).flatten(1)
        cos = torch.cos(z + phases[1]).flatten(1)
        return torch.cat([sin, cos, colors], 1)

    def field(self, coords: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """PCA-space features at the given points. Shape: (N, 2), (N, 3) -> (N, pca_dim)."""
        x = self.encode(coords, colors)
        if self.dropout_mode == "element" or not self.training:
            return self.mlp(x)
        return self._layers(x, 0)

    def _channel_masked(self, layer: nn.Linear) -> torch.Tensor:
        """The layer's weight with this step's channel-dropout mask folded in (one draw per input channel)."""
        keep = torch.rand(layer.in_features, device=layer.weight.device) >= self.dropout
        return layer.weight * (keep.to(layer.weight.dtype) / (1.0 - self.dropout))

    def _layers(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``mlp[start:]`` with channel dropout (in training) folded into the linear layers' weights."""
        layers = list(self.mlp)
        for i in range(start, len(layers)):
            layer = layers[i]
            if isinstance(layer, nn.Dropout):
                continue
            drop = i > 0 and isinstance(layers[i - 1], nn.Dropout) and self.training and self.dropout > 0
            if isinstance(layer, nn.Linear) and drop:
                x = F.linear(x, self._channel_masked(layer), layer.bias)
            elif isinstance(layer, nn.ReLU):
                x = torch.relu_(x)  # x is a fresh output of this module whose backward does not need it
            else:
                x = layer(x)
        return x

    # ------------------------------------------------------------------ the field on a whole pixel grid
    def _grid_field_applies(self, image: torch.Tensor | None = None) -> bool:
        """Whether :meth:`_grid_field` computes what ``field`` would (same maths, float rounding apart)."""
        if image is not None and (image.shape[0] != 1 or (image.requires_grad and torch.is_grad_enabled())):
            return False  # one image; its colour tables are constants (no gradient to the image)
        return (
            self.fast_field
            and not (self.training and self.dropout > 0 and self.dropout_mode == "element")
            and not _autocast_enabled(self.phases.device.type)  # its variance needs full precision
            and isinstance(self.mlp[0], nn.LayerNorm)
            and self.mlp[0].elementwise_affine
        )

    def _color_tables(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Constant per-pixel colour terms of the encoding of ``rgb`` (N, 3): ``[sin z, cos z, rgb]``
        (N, 6F + 3), ``[sin 2z, cos 2z]`` (N, 6F) and ``sum rgb^2`` (N,), with ``z = rgb * freqs``."""
        with torch.no_grad():
            z = (rgb[:, :, None] * self.freqs.to(rgb.dtype)).flatten(1)  # (N, 3F)
            first = torch.cat([torch.sin(z), torch.cos(z), rgb], 1)
            second = torch.cat([torch.sin(2 * z), torch.cos(2 * z)], 1)
            return first, second, rgb.square().sum(1)

    def _image_tables(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_color_tables` of every pixel of ``image`` (1, 3, H, W), cached while the image is unchanged
        (fitting evaluates the same image every step)."""
        work = self.phases.dtype
        # the image itself is part of the key (held, so its memory cannot be reused by another tensor)
        key = (image._version, work, self.freqs.device, self.n_freqs)
        cached = getattr(self, "_color_cache", None)
        if cached is None or cached[0] is not image or cached[1] != key:
            rgb = image[0].detach().to(work).permute(1, 2, 0).reshape(-1, 3)
            cached = (image, key, self._color_tables(rgb))
            self._color_cache = cached
        return cached[2]

    def _grid_field(
        self,
        tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        size: tuple[int, int],
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """``field`` at pixels ``start .. stop-1`` (row-major) of an ``(H, W)`` grid whose colours have the
        :meth:`_color_tables` ``tables``, without the per-pixel encoding. Shape: -> (stop - start, pca_dim).

        The coordinate half of the encoding is separable (a row term plus a column term), the colour half is
        ``sin(z + p) = sin z cos p + cos z sin p`` of constant ``sin z``, ``cos z``, and LayerNorm is affine
        per pixel, so LayerNorm + (channel-dropout-masked) first linear layer reduce to one product of the
        constant colour table with a small parameter-dependent matrix plus row and column terms; the per-pixel
        mean and variance come from the same tables (``sin^2 = (1 - cos 2(z + p)) / 2``).
        """
        h, w = size
        stop = h * w if stop is None else stop
        work = self.phases.dtype
        device = self.phases.device
        nf = self.n_freqs
        d_in = 10 * nf + 3
        norm, lin = self.mlp[0], self.mlp[2]
        weight = lin.weight
        if self.training and self.dropout > 0:  # channel dropout, drawn first as ``field`` does
            weight = self._channel_masked(lin)
        g = weight * norm.weight  # (H1, D): LayerNorm's scale folded in
        c0 = F.linear(norm.bias, weight, lin.bias)  # (H1,)
        g1 = g.sum(1)
        freqs, ph_sin, ph_cos = self.freqs.to(work), self.phases[0], self.phases[1]  # phases (5, F)

        def axis(n: int, ch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t = (2 * torch.arange(n, device=device, dtype=work) + 1) / n - 1
            z = t[:, None] * freqs
            e = torch.cat([torch.sin(z + ph_sin[ch]), torch.cos(z + ph_cos[ch])], 1)  # (n, 2F)
            cols = torch.cat([g[:, ch * nf : (ch + 1) * nf], g[:, (5 + ch) * nf : (6 + ch) * nf]], 1)
            return e @ cols.T, e.sum(1), e.square().sum(1)

        a_y, s_y, q_y = axis(h, 0)
        a_x, s_x, q_x = axis(w, 1)
        first, second, rgb_sq = tables
        cs, sn = torch.cos(ph_sin[2:]).flatten(), torch.sin(ph_sin[2:]).flatten()  # (3F,)
        cc, sc = torch.cos(ph_cos[2:]).flatten(), torch.sin(ph_cos[2:]).flatten()
        g_sin, g_cos = g[:, 2 * nf : 5 * nf], g[:, 7 * nf : 10 * nf]
        mat = torch.cat([(g_sin * cs - g_cos * sc).T, (g_sin * sn + g_cos * cc).T, g[:, 10 * nf :].T])
        ones = torch.ones(3, device=device, dtype=work)
        v_c = torch.cat([cs - sc, sn + cc, ones])  # first @ v_c: the sum of the colour features
        s_c = first @ v_c
        s2, c2 = torch.sin(2 * ph_sin[2:]).flatten(), torch.cos(2 * ph_sin[2:]).flatten()
        s2c, c2c = torch.sin(2 * ph_cos[2:]).flatten(), torch.cos(2 * ph_cos[2:]).flatten()
        q_c = second @ (0.5 * torch.cat([s2 - s2c, c2c - c2])) + (3 * nf) + rgb_sq  # their squares
        # (e - mean) @ G^T = e @ G^T - mean g1, the mean's share folded into each term's own matrix
        g1d = g1 / d_in
        mat = mat - v_c[:, None] * g1d  # (6F + 3, H1)
        a_y = a_y - s_y[:, None] * g1d
        a_x = a_x - s_x[:, None] * g1d
        if start == 0 and stop == h * w:  # the whole grid: row and column terms broadcast
            hidden = mat.shape[1]
            mean = (s_c.view(h, w) + s_y[:, None] + s_x[None]) / d_in
            msq = (q_c.view(h, w) + q_y[:, None] + q_x[None]) / d_in
            rows_cols = (a_y[:, None] + a_x[None]).view(h * w, hidden)  # (H*W, H1)
            # one GEMM over all pixels (its backward: one (6F + 3, H*W) @ (H*W, H1) product for ``mat``)
            acc = torch.addmm(rows_cols, first, mat)
            rstd = torch.rsqrt(msq - mean.square() + norm.eps).view(h * w, 1)
            # a fresh tensor, not a view: the in-place ReLU after it needs no CopySlices in backward
            y = _ScaleRows.apply(c0, acc, rstd)
        else:
            idx = torch.arange(start, stop, device=device)
            ys, xs = torch.div(idx, w, rounding_mode="floor"), idx % w
            mean = (s_c + s_y[ys] + s_x[xs]) / d_in
            msq = (q_c + q_y[ys] + q_x[xs]) / d_in
            acc = torch.addmm(a_y[ys] + a_x[xs], first, mat)
            rstd = torch.rsqrt(msq - mean.square() + norm.eps)
            y = torch.addcmul(c0, acc, rstd[:, None])
        return self._layers(y, 3)

    def forward_compressed(self, image: torch.Tensor) -> torch.Tensor:
        """Features in PCA space at every pixel of ``image`` (differentiable; used while fitting).

        Shape:
            - image: (B, 3, H, W) RGB in [0, 1], usually the stored image (B = 1)
            - output: (B, pca_dim, H, W)
        """
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"expected image (B,3,H,W) RGB in [0,1], got {got}")
        b, _, h, w = image.shape
        dtype = self.phases.dtype
        if self._grid_field_applies(image):
            out = self._grid_field(self._image_tables(image), (h, w))
        else:
            coords = pixel_coordinates((h, w), device=image.device, dtype=dtype).repeat(b, 1)
            colors = image.to(dtype).permute(0, 2, 3, 1).reshape(-1, 3)
            out = self.field(coords, colors)  # (B*H*W, k)
        out = out.view(b, h, w, self.pca_dim).permute(0, 3, 1, 2)
        return out + self.base_at((h, w)) if self.residual else out

    def _colors_at(self, size: tuple[int, int]) -> torch.Tensor:
        """The stored image at ``size`` (exact pixels at its own size), flattened to (H*W, 3)."""
        img = self.image.to(self.phases.dtype)
        if size != tuple(self.image_size):
            down = size[0] < self.image_size[0] or size[1] < self.image_size[1]
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=down).clamp(
                0, 1
            )
        return img[0].permute(1, 2, 0).reshape(-1, 3)

    def _require_ready(self) -> None:
        if not bool(self.has_image):
            raise RuntimeError(
                "ImplicitUpsampler has no image: call set_image(image) (or fit_implicit) first"
            )
        if not self.pca.fitted:
            raise RuntimeError("ImplicitUpsampler has no PCA: call set_pca(pca) (or fit_implicit) first")
        if self.consistency and not bool(self.has_lr):
            raise RuntimeError("ImplicitUpsampler has no low-res features: call set_lr(lr_feats) first")

    def render(
        self,
        size: int | Sequence[int] | None = None,
        *,
        chunk_pixels: int = 65536,
        dtype: torch.dtype | None = None,
        compressed: bool = False,
    ) -> torch.Tensor:
        """Features at any resolution, ``chunk_pixels`` pixels at a time, PCA undone (eval mode, no grad).

        Working memory is ``O(chunk_pixels * (hidden_dim + 10 n_freqs + C))`` besides the output itself and
        the colours at the output size (3 channels), so a 2048 x 2048 render needs no more than a 256 x 256
        one apart from its output.

        Args:
            size: output ``(H, W)`` (an int means square); None means ``image_size``.
            chunk_pixels: pixels evaluated per MLP call.
            dtype: dtype of the returned tensor (default: the module's).
            compressed: return the PCA coordinates (1, pca_dim, H, W) instead of features (the field itself:
                no back-projection).

        Shape:
            - output: (1, C, H, W)
        """
        if size is None:
            size = self.image_size
        hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"expected size as positive (H, W), got {size!r}")
        if int(chunk_pixels) < 1:
            raise ValueError(f"expected chunk_pixels >= 1, got {chunk_pixels}")
        self._require_ready()
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self._render(hw, int(chunk_pixels), dtype, compressed)  # type: ignore[arg-type]
        finally:
            self.train(was_training)

    def _render(
        self, size: tuple[int, int], chunk: int, dtype: torch.dtype | None, compressed: bool
    ) -> torch.Tensor:
        h, w = size
        device, work = self.phases.device, self.phases.dtype
        colors = self._colors_at(size)
        comps = self.pca.components.to(work)
        mean = self.pca.mean.to(work)
        channels = self.pca_dim if compressed else self.feat_dim
        out = torch.empty(channels, h * w, device=device, dtype=dtype or work)
        grid = self._grid_field_applies()  # the same arithmetic as forward_compressed while fitting
        for start in range(0, h * w, chunk):
            stop = min(start + chunk, h * w)
            if grid:
                z = self._grid_field(self._color_tables(colors[start:stop]), size, start, stop)
            else:
                coords = pixel_coordinates(size, start, stop, device=device, dtype=work)
                z = self.field(coords, colors[start:stop])  # (n, k)
            if self.residual:
                row0, row1 = start // w, (stop - 1) // w + 1
                z = z + self._base_rows(size, row0, row1)[start - row0 * w : stop - row0 * w]
            feats = z if compressed else torch.addmm(mean, z, comps)  # (n, C)
            out[:, start:stop] = feats.T
        out = out.view(1, channels, h, w)
        if self.consistency and not compressed and h >= self.lr_size[0] and w >= self.lr_size[1]:
            out = back_project(out, self.lr_feats, inplace=True)
        return out

    # ------------------------------------------------------------------ shared call
    def forward(
        self,
        lr_feats: torch.Tensor,
        image: torch.Tensor | None = None,
        output_size: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        if image is None and output_size is None:
            output_size = self.image_size
        return super().forward(lr_feats, image, output_size)

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if lr_feats.shape[0] != 1:
            raise ValueError(
                "ImplicitUpsampler is fitted to one image: "
                f"expected lr_feats (1,C,h,w), got {tuple(lr_feats.shape)}"
            )
        if lr_feats.shape[1] != self.feat_dim:
            raise ValueError(
                f"expected lr_feats with {self.feat_dim} channels (1,{self.feat_dim},h,w), "
                f"got {tuple(lr_feats.shape)}"
            )
        return self.render(size, dtype=lr_feats.dtype).to(lr_feats.device)
