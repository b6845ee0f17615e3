"""Autograd and fake (meta) kernels of ``torch.ops.featup``, registered from Python.

With these, the compiled ops are differentiable (twice: the backward op has its own autograd formula) and
traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from featup.kernels._validation import (
    check_adaptive_conv,
    check_adaptive_conv_backward,
    check_adaptive_conv_phases,
)

__all__ = ["register"]

_registered = False


def _adaptive_conv_fake(input: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    b, c, h, w, _ = check_adaptive_conv(input, filters)
    return input.new_empty((b, c, h, w))


def _adaptive_conv_backward_fake(
    grad_out: torch.Tensor, input: torch.Tensor, filters: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_adaptive_conv_backward(grad_out, input, filters)
    return input.new_empty(input.shape), filters.new_empty(filters.shape)


def _adaptive_conv_phases_fake(
    input: torch.Tensor, filters: torch.Tensor, out_padding: list[int]
) -> torch.Tensor:
    b, c, h, w, _, py, px = check_adaptive_conv_phases(input, filters, out_padding)
    left, right, top, bottom = out_padding
    return input.new_empty((b, c, top + py * h + bottom, left + px * w + right))


def _adaptive_conv_phases_pooled_fake(
    input: torch.Tensor, filters: torch.Tensor, out_padding: list[int], cell_w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w, _, py, px = check_adaptive_conv_phases(input, filters, out_padding)
    left, right, top, bottom = out_padding
    out = input.new_empty((b, c, top + py * h + bottom, left + px * w + right))
    return out, input.new_empty((b, c, py * h, px * w // cell_w))


def _adaptive_conv_phases_lifted_fake(
    input: torch.Tensor,
    filters: torch.Tensor,
    rows: torch.Tensor,
    row_start: torch.Tensor,
    row_weights: torch.Tensor,
) -> torch.Tensor:
    b, c, h, w, _, py, px = check_adaptive_conv_phases(input, filters, [0, 0, 0, 0])
    return input.new_empty((b, c, py * h, px * w))


def _footprint_sums_fake(
    input: torch.Tensor, weights: torch.Tensor, stride_y: int, stride_x: int
) -> torch.Tensor:
    return input.new_empty((input.shape[0], input.shape[1], weights.shape[1], weights.shape[2]))


def _filter_grad_fake(grad_out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    k = input.shape[2] - grad_out.shape[2] + 1
    return input.new_empty((grad_out.shape[0], grad_out.shape[2], grad_out.shape[3], k, k))


def _jbu_stage_kernel_fake(keys: torch.Tensor, *args: Any) -> torch.Tensor:
    taps = args[2].shape[0]  # log_spatial
    pad = 2 * (math.isqrt(taps) // 2)
    return keys.new_empty((keys.shape[0], keys.shape[2] - pad, keys.shape[3] - pad, taps))


def _jbu_stage_filters_fake(keys: torch.Tensor, *args: Any) -> torch.Tensor:
    rows, cols, py, px = args[12], args[13], args[14], args[15]  # after the 12 arguments of jbu_stage_kernel
    wd = rows.shape[2]
    return keys.new_empty((keys.shape[0], py, px, rows.shape[0] // py, cols.shape[0] // px, wd, wd))


def _filter_grad_setup(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _filter_grad_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The filter gradient is bilinear in (grad_out, input): its gradients are one adaptive_conv and one
    input gradient, both with the incoming gradient as the filters."""
    grad_out, input = ctx.saved_tensors
    need_g, need_x = ctx.needs_input_grad
    grad = grad.contiguous()
    d_g = torch.ops.featup.adaptive_conv(input, grad) if need_g else None
    d_x = torch.ops.featup.adaptive_conv_backward(grad_out, input, grad)[0] if need_x else None
    return d_g, d_x


def _phases_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, filters, out_padding = inputs
    ctx.save_for_backward(input, filters)
    ctx.out_padding = list(out_padding)


def _phases_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    """Per phase, the gradients of ``adaptive_conv`` on that phase's output pixels (differentiable ops, so
    second derivatives work as for adaptive_conv)."""
    input, filters = ctx.saved_tensors
    need_input, need_filters = ctx.needs_input_grad[:2]
    if not (need_input or need_filters):
        return None, None, None
    left, _, top, _ = ctx.out_padding
    py, px, h, w = filters.shape[1:5]
    inner = grad[..., top : top + py * h, left : left + px * w]
    grad_input = None
    grad_filters = []
    for p in range(py):
        for q in range(px):
            g = inner[..., p::py, q::px].contiguous()
            gi, gf = torch.ops.featup.adaptive_conv_backward(g, input, filters[:, p, q])
            grad_input = gi if grad_input is None else grad_input + gi
            grad_filters.append(gf)
    gf_all = torch.stack(grad_filters, 1).unflatten(1, (py, px)) if need_filters else None
    return (grad_input if need_input else None), gf_all, None


def _adaptive_conv_setup(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    input, filters = inputs
    ctx.save_for_backward(input, filters)


def _adaptive_conv_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    input, filters = ctx.saved_tensors
    need_input, need_filters = ctx.needs_input_grad
    if not (need_input or need_filters):
        return None, None
    grad_input, grad_filters = torch.ops.featup.adaptive_conv_backward(grad, input, filters)
    return (grad_input if need_input else None), (grad_filters if need_filters else None)


def _backward_setup(ctx: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
    grad_out, input, filters = inputs
    ctx.save_for_backward(grad_out, input, filters)


def _backward_grad(
    ctx: Any, grad_grad_input: torch.Tensor | None, grad_grad_filters: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Second derivatives: grad_input is bilinear in (grad_out, filters), grad_filters in (grad_out, input).

    With g = grad_out, x = input, f = filters and the incoming gradients gi', gf':
      d/dg = adaptive_conv(gi', f) + adaptive_conv(x, gf')
      d/dx = backward(g, x, gf').grad_input     (the input gradient of a conv with filters gf')
      d/df = backward(g, gi', f).grad_filters   (the filter gradient of a conv over gi')
    """
    grad_out, input, filters = ctx.saved_tensors
    need_g, need_x, need_f = ctx.needs_input_grad
    d_g = d_x = d_f = None
    if grad_grad_input is not None:
        if need_g:
            d_g = torch.ops.featup.adaptive_conv(grad_grad_input, filters)
        if need_f:
            d_f = torch.ops.featup.adaptive_conv_backward(grad_out, grad_grad_input, filters)[1]
    if grad_grad_filters is not None:
        if need_g:
            extra = torch.ops.featup.adaptive_conv(input, grad_grad_filters)
            d_g = extra if d_g is None else d_g + extra
        if need_x:
            d_x = torch.ops.featup.adaptive_conv_backward(grad_out, input, grad_grad_filters)[0]
    return d_g, d_x, d_f


def register() -> None:
    """Register the fake and autograd kernels (idempotent; called by ``featup.kernels`` at import)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("featup::adaptive_conv", _adaptive_conv_fake)
    torch.library.register_fake("featup::adaptive_conv_backward", _adaptive_conv_backward_fake)
    torch.library.register_autograd(
        "featup::adaptive_conv", _adaptive_conv_grad, setup_context=_adaptive_conv_setup
    )
    torch.library.register_autograd(
        "featup::adaptive_conv_backward", _backward_grad, setup_context=_backward_setup
    )
    if hasattr(torch.ops.featup, "adaptive_conv_filter_grad"):  # absent from builds that predate it
        torch.library.register_fake("featup::adaptive_conv_filter_grad", _filter_grad_fake)
        torch.library.register_autograd(
            "featup::adaptive_conv_filter_grad", _filter_grad_grad, setup_context=_filter_grad_setup
        )
    if hasattr(torch.ops.featup, "adaptive_conv_phases"):
        torch.library.register_fake("featup::adaptive_conv_phases", _adaptive_conv_phases_fake)
        torch.library.register_autograd(
            "featup::adaptive_conv_phases", _phases_grad, setup_context=_phases_setup
        )
    if hasattr(torch.ops.featup, "adaptive_conv_phases_pooled"):  # inference only: no autograd formula
        torch.library.register_fake("featup::adaptive_conv_phases_pooled", _adaptive_conv_phases_pooled_fake)
    if hasattr(torch.ops.featup, "adaptive_conv_phases_lifted"):  # inference only: no autograd formula
        torch.library.register_fake("featup::adaptive_conv_phases_lifted", _adaptive_conv_phases_lifted_fake)
    if hasattr(torch.ops.featup, "footprint_sums"):  # inference only: no autograd formula
        torch.library.register_fake("featup::footprint_sums", _footprint_sums_fake)
    if hasattr(torch.ops.featup, "jbu_stage_kernel"):  # inference only: no autograd formula
        torch.library.register_fake("featup::jbu_stage_kernel", _jbu_stage_kernel_fake)
    if hasattr(torch.ops.featup, "jbu_stage_filters"):  # inference only: no autograd formula
        torch.library.register_fake("featup::jbu_stage_filters", _jbu_stage_filters_fake)
    _registered = True
