"""Pure-PyTorch oracle for the adaptive convolution; the compiled kernels are tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featup.kernels._validation import check_adaptive_conv

__all__ = ["adaptive_conv_reference"]


def adaptive_conv_reference(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Adaptive convolution through ``unfold`` (materializes every K x K patch; slow, obviously correct).

    ``out[b, c, h, w] = sum_ij filters[b, h, w, i, j] * input[b, c, h + i, w + j]``

    Differentiable in both arguments through autograd. Half and bfloat16 are computed in float32 and rounded
    once, like the compiled kernels.

    Args:
        input: the already padded input.
        filters: one K x K kernel per output pixel, shared by all channels.

    Returns:
        The filtered output, in the dtype of ``input``.

    Raises:
        ValueError: on inconsistent shapes, dtypes or devices (see ``check_adaptive_conv``).

    Shape:
        - input: (B, C, H + K - 1, W + K - 1), already padded
        - filters: (B, H, W, K, K)
        - output: (B, C, H, W)
    """
    b, c, h, w, k = check_adaptive_conv(input, filters)
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):
        input, filters = input.float(), filters.float()
    patches = F.unfold(input, kernel_size=k)  # (B, C*K*K, H*W)
    patches = patches.view(b, c, k * k, h * w)
    weights = filters.reshape(b, h * w, k * k).transpose(1, 2)  # (B, K*K, H*W)
    out = torch.einsum("bckp,bkp->bcp", patches, weights)
    return out.view(b, c, h, w).to(dtype)
