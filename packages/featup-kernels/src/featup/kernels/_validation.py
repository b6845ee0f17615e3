"""Argument checks of the adaptive convolution, in Python, for the fake kernel and the reference.

The compiled kernels run the same checks in C++ (csrc/validation.cpp) with the same messages; this copy is
what ``torch.compile`` sees (the fake kernel) and what the pure-PyTorch oracle enforces.
"""

from __future__ import annotations

import torch

__all__ = ["check_adaptive_conv", "check_adaptive_conv_backward", "check_adaptive_conv_phases"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_adaptive_conv(input: torch.Tensor, filters: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``adaptive_conv(input, filters)`` arguments and return ``(B, C, H, W, K)``.

    Raises:
        TypeError: if an argument is not a tensor.
        ValueError: wrong rank, empty tensor, non-square kernels, batch or spatial size mismatch, non-floating
            dtype, dtype or device mismatch; the message says what was expected and what came.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, H, W, K, K)
    """
    for name, t in (("input", input), ("filters", filters)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"adaptive_conv: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if input.dim() != 4:
        raise ValueError(f"adaptive_conv: expected input (B,C,H+K-1,W+K-1), got {_shape(input)}")
    if filters.dim() != 5:
        raise ValueError(f"adaptive_conv: expected filters (B,H,W,K,K), got {_shape(filters)}")
    if input.numel() == 0 or filters.numel() == 0:
        raise ValueError(
            f"adaptive_conv: expected non-empty tensors, got input {_shape(input)} and filters "
            f"{_shape(filters)}"
        )
    b, h, w, k, k2 = filters.shape
    if k2 != k:
        raise ValueError(
            f"adaptive_conv: expected square kernels, filters (B,H,W,K,K) with K x K, got {k} x {k2} "
            f"(filters {_shape(filters)})"
        )
    if input.shape[0] != b:
        raise ValueError(f"adaptive_conv: batch mismatch, input has B={input.shape[0]} but filters has B={b}")
    if input.shape[2] != h + k - 1 or input.shape[3] != w + k - 1:
        raise ValueError(
            f"adaptive_conv: expected input spatial size (H+K-1, W+K-1) = ({h + k - 1}, {w + k - 1}) for "
            f"filters {_shape(filters)}, got input {_shape(input)}"
        )
    if not (input.dtype.is_floating_point and filters.dtype.is_floating_point):
        raise ValueError(
            f"adaptive_conv: expected floating-point tensors, got input {_dtype(input)} and filters "
            f"{_dtype(filters)}"
        )
    if input.dtype != filters.dtype:
        raise ValueError(
            f"adaptive_conv: dtype mismatch, input is {_dtype(input)} but filters is {_dtype(filters)}"
        )
    if input.device != filters.device:
        raise ValueError(
            f"adaptive_conv: device mismatch, input is on {input.device} but filters is on {filters.device}"
        )
    return b, input.shape[1], h, w, k


def check_adaptive_conv_backward(
    grad_out: torch.Tensor, input: torch.Tensor, filters: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """Validate ``adaptive_conv_backward`` arguments and return ``(B, C, H, W, K)``.

    Shape:
        - grad_out: (B, C, H, W)
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, H, W, K, K)
    """
    b, c, h, w, k = check_adaptive_conv(input, filters)
    if grad_out.dim() != 4 or tuple(grad_out.shape) != (b, c, h, w):
        raise ValueError(
            f"adaptive_conv_backward: expected grad_out (B,C,H,W) = ({b}, {c}, {h}, {w}), "
            f"got {_shape(grad_out)}"
        )
    if grad_out.dtype != input.dtype:
        raise ValueError(
            f"adaptive_conv_backward: dtype mismatch, grad_out is {_dtype(grad_out)} but input is "
            f"{_dtype(input)}"
        )
    if grad_out.device != input.device:
        raise ValueError(
            f"adaptive_conv_backward: device mismatch, grad_out is on {grad_out.device} but input is on "
            f"{input.device}"
        )
    return b, c, h, w, k


def check_adaptive_conv_phases(
    input: torch.Tensor, filters: torch.Tensor, out_padding: list[int]
) -> tuple[int, int, int, int, int, int, int]:
    """Validate ``adaptive_conv_phases`` arguments and return ``(B, C, H, W, K, Py, Px)``.

    Shape:
        - input: (B, C, H + K - 1, W + K - 1)
        - filters: (B, Py, Px, H, W, K, K)
        - out_padding: [left, right, top, bottom], each >= 0
    """
    if not isinstance(filters, torch.Tensor) or filters.dim() != 7:
        got = _shape(filters) if isinstance(filters, torch.Tensor) else type(filters).__name__
        raise ValueError(f"adaptive_conv_phases: expected filters (B,Py,Px,H,W,K,K), got {got}")
    pad = list(out_padding)
    if len(pad) != 4 or any(int(v) < 0 for v in pad):
        raise ValueError(
            f"adaptive_conv_phases: expected out_padding [left, right, top, bottom] >= 0, got {pad}"
        )
    py, px = filters.shape[1], filters.shape[2]
    if py == 0 or px == 0:
        raise ValueError(f"adaptive_conv_phases: expected non-empty tensors, got filters {_shape(filters)}")
    b, c, h, w, k = check_adaptive_conv(input, filters[:, 0, 0])
    return b, c, h, w, k, py, px
