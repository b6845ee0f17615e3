"""Learned downsamplers (paper Section 3.1): a blur kernel, and attention pooling (eq. 2).

Both pool every low-resolution output pixel from a ``k x k`` window of the high-resolution map. Windows are
centred on the output pixel's footprint: output pixel ``i`` of ``h`` covers input rows ``[i H/h, (i+1) H/h)``
and its window starts at ``round((i + 1/2) H/h - k/2)``. So any input size, any output size and any aspect
ratio work (the original code assumed square inputs and ``(H - k) / (h - 1)`` strides), and for a ViT grid
(``H = 16 h``, ``k = 16``) the windows are exactly the patches. Taps that fall outside the map are masked out
of the softmax, so the pooling weights always sum to 1 over the taps that exist: features stay in their
space and a constant map stays constant.

The weighted window sum is a custom autograd function made of one batched matrix product per output row, so
neither forward nor backward ever holds the ``(B, C, h, w, k, k)`` tensor of gathered windows (for k = 29
that would be ~3x the high-resolution map), and it runs at GEMM speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionDownsampler",
    "SimpleDownsampler",
    "create_downsampler",
    "gaussian_blur",
    "window_indices",
    "window_pool",
]


def gaussian_blur(x: torch.Tensor, kernel_size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect borders (the same kernel on every channel, so it commutes with
    any channel mixing); the original code's ``blur_attn`` pre-blur is ``kernel_size=5, sigma=1``.

    Shape:
        - x: (B, C, H, W)
        - output: (B, C, H, W)
    """
    radius = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=x.dtype) - radius
    g = torch.exp(-coords.square() / (2 * sigma**2))
    weights = (g / g.sum()).tolist()
    h, w = x.shape[-2:]
    mode = "reflect" if min(h, w) > radius else "replicate"
    padded = F.pad(x, [radius] * 4, mode=mode)
    # separable, as K shifted multiply-adds per axis: a depthwise conv2d over (B*C, 1, H, W) took half of a
    # train_jbu step (mkldnn runs one-channel convolutions slowly, forward and backward alike)
    rows = padded[..., :, 0:w] * weights[0]
    for k in range(1, kernel_size):
        rows = rows.add_(padded[..., :, k : k + w], alpha=weights[k])
    out = rows[..., 0:h, :] * weights[0]
    for k in range(1, kernel_size):
        out = out.add_(rows[..., k : k + h, :], alpha=weights[k])
    return out


def window_indices(
    in_size: int, out_size: int, kernel_size: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input indices of each output pixel's window along one axis, clamped into range, and their validity.

    Shape:
        - output: indices (out_size, kernel_size) long, valid (out_size, kernel_size) bool
    """
    start = torch.tensor(_window_starts(in_size, out_size, kernel_size), device=device, dtype=torch.long)
    idx = start[:, None] + torch.arange(kernel_size, device=device, dtype=torch.long)[None, :]
    valid = (idx >= 0) & (idx < in_size)
    return idx.clamp(0, in_size - 1), valid


def _window_starts(in_size: int, out_size: int, kernel_size: int) -> list[int]:
    # start = floor((i + 1/2) * in/out - k/2 + 1/2), in exact integer arithmetic
    return [
        ((2 * i + 1) * in_size + out_size - kernel_size * out_size) // (2 * out_size) for i in range(out_size)
    ]


def _row_scatter_index(length: int, width: int, cols: torch.Tensor, out_w: int) -> torch.Tensor:
    """Flat positions in the (length * width, out_w) pooling matrix of one output row. Shape: (w, L, kw)."""
    u = torch.arange(length, device=cols.device)[None, :, None]
    j = torch.arange(out_w, device=cols.device)[:, None, None]
    return (u * width + cols[:, None, :]) * out_w + j


class _WindowPool(torch.autograd.Function):
    """out[b,c,i,j] = sum_{u,v} weights[b,i,j,u,v] * x[b,c,row_i+u,cols[j,v]], over taps inside the map.

    Per output row ``i`` the rows its windows read form one contiguous slice of ``x`` (L rows), so the row
    is a batched matrix product ``x[:, :, slice].view(B, C, L*W) @ M_i`` with a mostly-zero pooling
    matrix ``M_i`` (L*W, w) scattered from the weights. GEMMs beat gathering ``k^2`` shifted copies several
    times over on the CPU, and only one row's ``M_i`` exists at a time (it is rebuilt in backward).
    """

    @staticmethod
    def forward(ctx, x, weights, plan, cols):  # type: ignore[override]
        b, c, _, in_w = x.shape
        h, w = weights.shape[1], weights.shape[2]
        x = x.contiguous()
        out = x.new_empty(b, c, h, w)
        for i, (first, u0, u1) in enumerate(plan):
            length = u1 - u0
            idx = _row_scatter_index(length, in_w, cols, w).reshape(1, -1).expand(b, -1)
            vals = weights[:, i, :, u0:u1, :].reshape(b, -1)
            mat = x.new_zeros(b, length * in_w * w).scatter_add_(1, idx, vals).view(b, length * in_w, w)
            rows = x[:, :, first : first + length, :].reshape(b, c, length * in_w)
            out[:, :, i, :] = torch.bmm(rows, mat)
        ctx.plan = plan
        ctx.save_for_backward(x, weights, cols)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weights, cols = ctx.saved_tensors
        b, c, _, in_w = x.shape
        w = weights.shape[2]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weights) if need_w else None
        grad = grad.contiguous()
        for i, (first, u0, u1) in enumerate(ctx.plan):
            length = u1 - u0
            idx = _row_scatter_index(length, in_w, cols, w).reshape(1, -1).expand(b, -1)
            g = grad[:, :, i, :]  # (B, C, w)
            if need_x:
                vals = weights[:, i, :, u0:u1, :].reshape(b, -1)
                mat = x.new_zeros(b, length * in_w * w).scatter_add_(1, idx, vals).view(b, length * in_w, w)
                grad_x[:, :, first : first + length, :] += torch.bmm(g, mat.transpose(1, 2)).view(
                    b, c, length, in_w
                )
            if need_w:
                rows = x[:, :, first : first + length, :].reshape(b, c, length * in_w)
                grad_mat = torch.bmm(rows.transpose(1, 2), g).reshape(b, -1)  # (B, L*W*w)
                grad_w[:, i, :, u0:u1, :] = grad_mat.gather(1, idx).view(b, w, length, -1)
        return grad_x, grad_w, None, None


def window_pool(x: torch.Tensor, weights: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
    """Weighted sum over each output pixel's window (:func:`window_indices`), skipping taps outside the map.

    Differentiable in ``x`` and ``weights``; memory stays ``O(B C H W)`` (no tensor of gathered windows).

    Shape:
        - x: (B, C, H, W)
        - weights: (B or 1, h, w, kh, kw)
        - output: (B, C, h, w) with (h, w) = ``output_size``
    """
    h, w = _resolve_output_size(output_size)
    if weights.dim() != 5 or tuple(weights.shape[1:3]) != (h, w):
        raise ValueError(f"expected weights (B,{h},{w},kh,kw), got {tuple(weights.shape)}")
    in_h, in_w = x.shape[-2:]
    kh, kw = weights.shape[-2:]
    plan = []
    for start in _window_starts(in_h, h, kh):
        u0, u1 = max(0, -start), min(kh, in_h - start)
        plan.append((start + u0, u0, u1))
    cols, valid_cols = window_indices(in_w, w, kw, x.device)
    # columns outside the map were clamped onto the border: zero their weights so they are skipped
    weights = weights.to(x.dtype) * valid_cols.to(x.dtype)[None, None, :, None, :]
    weights = weights.expand(x.shape[0], -1, -1, -1, -1)
    return _WindowPool.apply(x, weights, plan, cols)


def _check_hr(hr: object, name: str = "hr") -> torch.Tensor:
    if not isinstance(hr, torch.Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor (B,C,H,W), got {type(hr).__name__}")
    if hr.dim() != 4 or hr.numel() == 0:
        raise ValueError(f"expected {name} (B,C,H,W) non-empty, got shape {tuple(hr.shape)}")
    if not hr.is_floating_point():
        raise ValueError(f"expected floating-point {name}, got dtype {hr.dtype}")
    return hr


def _resolve_output_size(output_size: int | Sequence[int]) -> tuple[int, int]:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"expected output_size as positive (h, w), got {output_size!r}")
    return size  # type: ignore[return-value]


def _masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the trailing (k, k) taps, ignoring taps outside the map."""
    shape = logits.shape
    flat = logits.masked_fill(~valid, float("-inf")).flatten(-2)
    return flat.softmax(-1).view(shape)


class SimpleDownsampler(nn.Module):
    """Blur with one learned ``k x k`` kernel (non-negative, sums to 1) shared by all channels, subsample.

    The kernel is a softmax of free logits (initialised to zero: a box filter), so it is non-negative and sums
    to one by construction.

    Args:
        kernel_size: side of the square kernel.

    Shape:
        - hr: (B, C, H, W)
        - output: (B, C, h, w) with (h, w) = ``output_size``
    """

    def __init__(self, kernel_size: int = 16) -> None:
        super().__init__()
        if int(kernel_size) < 1:
            raise ValueError(f"expected kernel_size >= 1, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.kernel_logits = nn.Parameter(torch.zeros(self.kernel_size, self.kernel_size))

    @property
    def kernel(self) -> torch.Tensor:
        """The blur kernel (k, k): non-negative, sums to 1."""
        return self.kernel_logits.flatten().softmax(0).view_as(self.kernel_logits)

    def kernels(self, hr: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
        """Pooling weights of every output pixel (the kernel renormalised over the taps inside the map).

        Shape:
            - output: (1, h, w, k, k)
        """
        h, w = _resolve_output_size(output_size)
        k = self.kernel_size
        rows, vr = window_indices(hr.shape[-2], h, k, hr.device)
        cols, vc = window_indices(hr.shape[-1], w, k, hr.device)
        valid = vr[:, None, :, None] & vc[None, :, None, :]
        logits = self.kernel_logits.to(hr.dtype).view(1, 1, 1, k, k).expand(1, h, w, k, k)
        return _masked_softmax(logits, valid)

    def forward(self, hr: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
        _check_hr(hr)
        h, w = _resolve_output_size(output_size)
        return window_pool(hr, self.kernels(hr, (h, w)), (h, w))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class AttentionDownsampler(nn.Module):
    """Attention pooling (eq. 2): 1x1-conv salience, learned weight and bias kernels, softmax per window.

    For output pixel ``(i, j)`` with window ``Omega_ij``::

        a = softmax_{Omega_ij}( w * salience(F)[Omega_ij] + b )        # w, b: learned (k, k) kernels
        out[:, i, j] = sum_{Omega_ij} a * F[:, Omega_ij]

    Args:
        dim: channels of the high-resolution features.
        kernel_size: side of the square window (Table 7: 16 for JBU, 29 for the implicit model).
        dropout: dropout on the features before the salience conv during training (as in the original code);
            eval mode is deterministic.
        blur: blur the high-resolution features with a 5x5 Gaussian (sigma 1) before windowing, for both the
            salience and the pooled values (the original code's ``blur_attn``).

    Shape:
        - hr: (B, dim, H, W)
        - output: (B, dim, h, w) with (h, w) = ``output_size``
    """

    def __init__(self, dim: int, kernel_size: int = 16, *, dropout: float = 0.2, blur: bool = False) -> None:
        super().__init__()
        if int(dim) < 1 or int(kernel_size) < 1:
            raise ValueError(
                f"expected dim >= 1 and kernel_size >= 1, got dim={dim}, kernel_size={kernel_size}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        self.dim = int(dim)
        self.kernel_size = k = int(kernel_size)
        self.dropout = float(dropout)
        if not isinstance(blur, bool):
            raise TypeError(f"expected blur as True or False, got {blur!r}")
        self.blur = blur
        self.salience_net = nn.Sequential(nn.Dropout(self.dropout), nn.Conv2d(self.dim, 1, 1))
        # near-uniform start (w ~ 1, b ~ 0) like the original, with a little noise to break symmetry
        self.weight = nn.Parameter(torch.ones(k, k) + 0.01 * torch.randn(k, k))
        self.bias = nn.Parameter(0.01 * torch.randn(k, k))

    def salience(self, hr: torch.Tensor) -> torch.Tensor:
        """Salience logits of every high-resolution pixel.

        Shape:
            - hr: (B, dim, H, W)
            - output: (B, 1, H, W)
        """
        _check_hr(hr)
        if hr.shape[1] != self.dim:
            raise ValueError(
                f"expected hr with {self.dim} channels (B,{self.dim},H,W), got {tuple(hr.shape)}"
            )
        return self.salience_net(hr)

    def kernels(self, hr: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
        """Pooling weights of every output pixel (sum to 1 over the taps inside the map).

        Shape:
            - output: (B, h, w, k, k)
        """
        return self.salience_kernels(self.salience(hr), output_size)

    def salience_kernels(self, salience: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
        """Pooling weights from given salience logits (what :meth:`kernels` does after :meth:`salience`).

        Lets a caller compute the salience another way, e.g. as the upsampled low-resolution
        ``conv(f)`` of a channel-linear upsampler, which equals ``conv`` of the upsampled features.

        Shape:
            - salience: (B, 1, H, W)
            - output: (B, h, w, k, k)
        """
        h, w = _resolve_output_size(output_size)
        k = self.kernel_size
        if salience.dim() != 4 or salience.shape[1] != 1:
            raise ValueError(f"expected salience (B,1,H,W), got {tuple(salience.shape)}")
        sal = salience[:, 0]
        rows, vr = window_indices(sal.shape[-2], h, k, sal.device)
        cols, vc = window_indices(sal.shape[-1], w, k, sal.device)
        b = sal.shape[0]
        # (B, h*k, W) -> (B, h, k, w, k) -> (B, h, w, k, k)
        sal = sal.index_select(1, rows.reshape(-1)).index_select(2, cols.reshape(-1))
        sal = sal.view(b, h, k, w, k).permute(0, 1, 3, 2, 4)
        logits = sal * self.weight.to(sal.dtype) + self.bias.to(sal.dtype)
        valid = vr[:, None, :, None] & vc[None, :, None, :]
        return _masked_softmax(logits, valid)

    def prepare(self, hr: torch.Tensor) -> torch.Tensor:
        """The map that is windowed: ``hr`` itself, or its Gaussian pre-blur when ``blur`` is on."""
        return gaussian_blur(hr) if self.blur else hr

    def forward(self, hr: torch.Tensor, output_size: int | Sequence[int]) -> torch.Tensor:
        h, w = _resolve_output_size(output_size)
        hr = self.prepare(_check_hr(hr))
        return window_pool(hr, self.kernels(hr, (h, w)), (h, w))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, dropout={self.dropout}, blur={self.blur}"


def create_downsampler(kind: str, dim: int, kernel_size: int, *, blur: bool = False) -> nn.Module:
    """Build a downsampler by name: ``"simple"`` (learned blur) or ``"attention"`` (eq. 2; ``blur`` turns on
    its Gaussian pre-blur)."""
    if kind == "simple":
        return SimpleDownsampler(kernel_size)
    if kind == "attention":
        return AttentionDownsampler(dim, kernel_size, blur=blur)
    raise ValueError(f"unknown downsampler {kind!r}; expected 'simple' or 'attention'")
