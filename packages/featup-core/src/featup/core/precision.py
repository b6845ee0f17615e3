"""Mixed precision: bfloat16 / float16 autocast for inference and training, and its measured error.

Under ``torch.autocast`` the 1x1 convolutions of the JBU's range MLP, the implicit network's layers and the
backbone run in the low-precision dtype, which halves their memory traffic. The adaptive convolution, where
49 products per pixel and channel are summed, must keep accumulating in float32: ``featup.kernels`` registers
an autocast rule for ``featup::adaptive_conv`` that casts both arguments to the autocast dtype and the
kernel sums in float32, rounding only the result (:func:`adaptive_conv_autocast_error` checks that the error
is at most one rounding of the output, which summing in the low-precision dtype exceeds several times).
Outputs of :func:`upsample_mixed` are returned in the input's dtype.

Training: ``train_jbu(..., precision="bfloat16")`` / ``fit_implicit`` (:data:`TRAINING_PRECISIONS`) run the
forward passes of each step under :func:`mixed_precision`, compute the loss in float32 inside
:func:`full_precision` from outputs cast up by :func:`to_float32`, and scale float16 losses with
:func:`make_grad_scaler`; parameters and optimizer state stay float32.

The error against float32 is a property of the model and the data, so it is measured, not promised:
:func:`precision_error` (inference) and :func:`gradient_precision_error` (training) report it, the tests bound
it, and ``tools/bench_tiling.py`` prints it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from featup.core._checks import check_features, check_image

__all__ = [
    "TRAINING_PRECISIONS",
    "PrecisionError",
    "adaptive_conv_autocast_error",
    "check_dtype",
    "check_training_precision",
    "full_precision",
    "gradient_precision_error",
    "make_grad_scaler",
    "mixed_precision",
    "precision_error",
    "resolve_precision",
    "to_float32",
    "upsample_mixed",
]

#: the ``precision=`` values of ``train_jbu`` / ``fit_implicit`` (one spelling each, as stored in checkpoints)
TRAINING_PRECISIONS = ("float32", "bfloat16", "float16")

_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
}


def resolve_precision(precision: str | torch.dtype | None) -> torch.dtype:
    """``"fp32"|"bf16"|"fp16"`` (or a dtype, or None for float32) -> the torch dtype."""
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype):
        return check_dtype(precision)
    key = str(precision).lower()
    if key not in _NAMES:
        raise ValueError(f"expected precision fp32, bf16 or fp16, got {precision!r}")
    return _NAMES[key]


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Require one of the dtypes autocast supports here: float32 (off), bfloat16, float16."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"expected dtype torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


@contextlib.contextmanager
def mixed_precision(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Autocast context for ``dtype`` on ``device``'s type; float32 means no autocast at all.

    Use it around the forward pass and loss of a training step (backward outside it, as PyTorch advises),
    with :func:`make_grad_scaler` for float16.
    """
    dtype = resolve_precision(dtype)
    device_type = torch.device(device).type
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def check_training_precision(precision: object) -> str:
    """Require one of :data:`TRAINING_PRECISIONS` (the exact strings; checkpoints store this spelling)."""
    if not isinstance(precision, str) or precision not in TRAINING_PRECISIONS:
        accepted = ", ".join(repr(p) for p in TRAINING_PRECISIONS)
        raise ValueError(f"expected precision one of {accepted}, got {precision!r}")
    return precision


@contextlib.contextmanager
def full_precision(device: torch.device | str = "cpu") -> Iterator[None]:
    """Switch autocast off on ``device``'s type, e.g. for a loss inside a :func:`mixed_precision` block.

    Autocast would otherwise run the loss's matmuls (the random projection) in the low-precision dtype;
    with it off, float32 inputs (see :func:`to_float32`) give a float32 loss.
    """
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield


def to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 tensors as float32; any other tensor unchanged (float32 is not copied, and float64
    is not rounded down)."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def make_grad_scaler(
    dtype: torch.dtype | str | None, device: torch.device | str = "cpu"
) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for float16 (bfloat16 has float32's range and needs no scaling)."""
    dtype = resolve_precision(dtype)
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def upsample_mixed(
    up: nn.Module | Callable[..., torch.Tensor],
    lr_feats: torch.Tensor,
    image: torch.Tensor | None,
    output_size: int | Sequence[int] | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    tile: int | None = None,
) -> torch.Tensor:
    """Run ``up`` under autocast in ``dtype`` and inference mode; returns the input's dtype.

    Args:
        up: any upsampler ``up(lr_feats, image, output_size=...)``.
        lr_feats: low-resolution features (float32 or float64).
        image: guidance image in [0, 1] or None for unguided upsamplers.
        output_size: (H, W), int, or None for the image size.
        dtype: autocast dtype, ``torch.bfloat16`` (default) or ``torch.float16`` (float32 = plain call).
        tile: if given, run through :func:`featup.core.tiling.tiled_upsample` with this tile size.

    Shape:
        - lr_feats: (B, C, h, w)
        - image: (B, 3, H, W)
        - output: (B, C, H', W'), dtype of ``lr_feats``
    """
    check_features(lr_feats, "lr_feats")
    if image is not None:
        check_image(image, lr_feats)
    with torch.inference_mode(), mixed_precision(dtype, lr_feats.device):
        if tile is not None:
            from featup.core.tiling import tiled_upsample

            out = tiled_upsample(up, lr_feats, image, output_size, tile=tile)
        else:
            out = up(lr_feats, image, output_size=output_size)
    return out.to(lr_feats.dtype)


@dataclass(frozen=True)
class PrecisionError:
    """Error of a low-precision result against float32.

    Attributes:
        dtype: the autocast dtype measured.
        max_abs: max |low - ref|.
        rel_max: max_abs / max |ref|.
        rel_l2: ||low - ref||_2 / ||ref||_2.
        min_cosine: lowest per-pixel cosine similarity of the feature vectors (1 = same direction).
    """

    dtype: str
    max_abs: float
    rel_max: float
    rel_l2: float
    min_cosine: float

    def as_dict(self) -> dict:
        return asdict(self)


def _compare(low: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> PrecisionError:
    low, ref = low.double(), ref.double()
    diff = low - ref
    scale = ref.abs().max().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1, eps=1e-12) if ref.dim() == 4 else None
    return PrecisionError(
        dtype=str(dtype).replace("torch.", ""),
        max_abs=float(diff.abs().max()),
        rel_max=float(diff.abs().max() / scale),
        rel_l2=float(diff.norm() / ref.norm().clamp_min(1e-30)),
        min_cosine=float(cos.min()) if cos is not None else float("nan"),
    )


def precision_error(
    up: nn.Module | Callable[..., torch.Tensor],
    lr_feats: torch.Tensor,
    image: torch.Tensor | None,
    output_size: int | Sequence[int] | None = None,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
) -> PrecisionError:
    """Measure ``upsample_mixed(..., dtype)`` against the float32 call on the same inputs.

    Shape:
        - lr_feats: (B, C, h, w) float32
        - image: (B, 3, H, W)
    """
    dtype = resolve_precision(dtype)
    lr32 = lr_feats.float()
    img32 = None if image is None else image.float()
    with torch.inference_mode():
        ref = up(lr32, img32, output_size=output_size)
    low = upsample_mixed(up, lr32, img32, output_size, dtype=dtype)
    return _compare(low, ref, dtype)


def gradient_precision_error(
    module: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    loss_scale: float | None = None,
) -> dict[str, PrecisionError]:
    """Error of the parameter gradients of one mixed-precision training step against float32.

    ``loss_fn(module)`` computes a scalar loss (forward included); it is run once plainly and once under
    :func:`mixed_precision`, and the gradients are compared per parameter and, under the key ``"all"``, for
    all parameters concatenated (``min_cosine`` is then the cosine of the whole gradient vectors). The
    module's grads are left cleared. Float16 needs loss scaling, as in training with :func:`make_grad_scaler`:
    without it small gradients underflow to zero. ``loss_scale`` defaults to ``2**16`` for float16 and 1
    otherwise (the gradients are divided by it again before comparing).
    """
    dtype = resolve_precision(dtype)
    if loss_scale is None:
        loss_scale = 2.0**16 if dtype == torch.float16 else 1.0
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"expected a module with trainable parameters, got {type(module).__name__} with none"
        )

    def grads(low: bool) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        ctx = mixed_precision(dtype, params[0][1].device) if low else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(module)
        scale = loss_scale if low else 1.0
        (loss.float() * scale).backward()
        out = [torch.zeros_like(p) if p.grad is None else p.grad.detach() / scale for _, p in params]
        module.zero_grad(set_to_none=True)
        return out

    ref, low = grads(False), grads(True)
    result = {
        n: _compare(g_low.reshape(1, -1), g_ref.reshape(1, -1), dtype)
        for (n, _), g_ref, g_low in zip(params, ref, low)
    }
    flat_ref = torch.cat([g.reshape(-1) for g in ref])
    flat_low = torch.cat([g.reshape(-1) for g in low])
    result["all"] = _compare(flat_low.view(1, -1, 1, 1), flat_ref.view(1, -1, 1, 1), dtype)
    return result


def adaptive_conv_autocast_error(
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    channels: int = 16,
    size: int = 24,
    kernel: int = 7,
    seed: int = 0,
) -> dict[str, float | str]:
    """Check how ``featup.kernels.adaptive_conv`` behaves under autocast in ``dtype``.

    Inputs are made exactly representable in ``dtype``, so the only error left is the accumulation and
    the rounding of the output. Returns the output dtype under autocast and its max relative error against
    a float64 computation; float32 accumulation gives at most one rounding of the output (about
    ``2**-8`` for bfloat16 and ``2**-11`` for float16, and ~1e-7 if the output stays float32).
    """
    from featup.kernels import adaptive_conv, adaptive_conv_reference

    dtype = resolve_precision(dtype)
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(1, channels, size + kernel - 1, size + kernel - 1, generator=g).to(dtype).float()
    filt = torch.softmax(torch.randn(1, size, size, kernel * kernel, generator=g), -1)
    filt = filt.view(1, size, size, kernel, kernel).to(dtype).float()
    ref = adaptive_conv_reference(inp.double(), filt.double())
    with torch.inference_mode(), mixed_precision(dtype, "cpu"):
        out = adaptive_conv(inp, filt)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    return {"output_dtype": str(out.dtype).replace("torch.", ""), "rel_max": float(err)}
