"""featup.kernels: the fused adaptive convolution (CPU and CUDA) behind FeatUp's JBU upsampler.

``adaptive_conv(input, filters)`` runs the compiled ``torch.ops.featup.adaptive_conv`` op (differentiable in
both arguments, ``torch.compile``-able, autocast-aware); ``adaptive_conv_reference`` is the pure-PyTorch
oracle with identical semantics.
"""

from __future__ import annotations

from typing import Any

import torch

from featup.kernels import _ops
from featup.kernels._build import load_extension
from featup.kernels._reference import adaptive_conv_reference

__all__ = ["adaptive_conv", "adaptive_conv_reference", "build_info"]

_C = load_extension()
_ops.register()


def adaptive_conv(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Adaptive convolution: every output pixel has its own K x K kernel, shared by all channels.

    ``out[b, c, h, w] = sum_ij filters[b, h, w, i, j] * input[b, c, h + i, w + j]``

    Differentiable in both arguments (and twice). CPU and CUDA; float32 and float64, half and bfloat16 with
    float32 accumulation. Inside ``torch.autocast`` both arguments are cast to the autocast dtype. Any strides
    are accepted.

    Args:
        input: the already padded input.
        filters: one K x K kernel per output pixel.

    Returns:
        The filtered output, contiguous, in the dtype of the arguments.

    Raises:
        ValueError: wrong rank, empty tensor, non-square kernels, batch mismatch, input spatial size not equal
            to output size + K - 1, non-floating dtype, dtype or device mismatch.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, H, W, K, K)
        - output: (B, C, H, W)
    """
    return torch.ops.featup.adaptive_conv(input, filters)


def build_info() -> dict[str, Any]:
    """Facts of the installed build.

    Returns:
        ``torch_version`` built against, ``cxx11_abi``, ``cuda`` (bool: CUDA kernels compiled in),
        ``cuda_version`` and ``cuda_architectures`` (None without CUDA), ``cpu_isa`` (the CPU kernels in use:
        ``"avx2"`` or ``"default"``), and ``running_torch_version``.
    """
    info = dict(_C.build_info())
    info["running_torch_version"] = torch.__version__
    return info
