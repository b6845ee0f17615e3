"""Test helpers shared by the core tests: a frozen toy backbone with known high-res features, state-dict
comparisons and an interrupting step callback (imported by the test modules; see conftest.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PooledPointwise(nn.Module):
    """Frozen toy backbone: ``avg_pool(tanh(A x + b), stride)``; ``hr_features`` is the known ideal.

    Shape: (B, 3, H, W) -> (B, dim, H / stride, W / stride).
    """

    def __init__(self, dim: int = 8, stride: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stride = stride
        self.proj = nn.Conv2d(3, dim, 1)
        with torch.no_grad():
            self.proj.weight.copy_(3.0 * torch.randn(dim, 3, 1, 1, generator=g))
            self.proj.bias.copy_(torch.randn(dim, generator=g))
        self.requires_grad_(False)

    def hr_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x - 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.hr_features(x), self.stride)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


class Interrupt(Exception):
    """Raised by :func:`interrupt_at` to cut a run short."""


def interrupt_at(step: int):
    """A step callback that raises :class:`Interrupt` at ``step``."""

    def callback(s: int, logs: dict) -> None:
        if s == step:
            raise Interrupt

    return callback


def assert_two_runs_equal(
    up: nn.Module, x: torch.Tensor, image: torch.Tensor, configure
) -> dict[str, torch.Tensor]:
    """Run ``up`` twice on the same inputs, ``configure(run, x, image)`` (run 0, then 1) setting each run up
    just before its forward, and assert equal outputs and gradients (of the input, the image and every
    parameter). Returns the first run's parameter gradients."""
    runs = []
    for run in (0, 1):
        up.zero_grad()
        xi, ii = x.clone().requires_grad_(True), image.clone().requires_grad_(True)
        configure(run, xi, ii)
        out = up(xi, ii)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        params = {n: p.grad.clone() for n, p in up.named_parameters() if p.grad is not None}
        runs.append((out.detach(), xi.grad, ii.grad, params))
    (o0, x0, i0, p0), (o1, x1, i1, p1) = runs
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(x1, x0)
    torch.testing.assert_close(i1, i0)
    assert p0.keys() == p1.keys()
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], msg=name)
    return p0


def assert_fused_gradients_equal_plain(
    up: nn.Module, x: torch.Tensor, image: torch.Tensor, before_forward=None
) -> dict[str, torch.Tensor]:
    """:func:`assert_two_runs_equal` of a ``JBUStack``'s plain path (run 0) and fused path (run 1);
    ``before_forward(x, image)`` runs before each forward (a seed, an extra check)."""

    def configure(run: int, xi: torch.Tensor, ii: torch.Tensor) -> None:
        up.fused = bool(run)
        if before_forward is not None:
            before_forward(xi, ii)

    return assert_two_runs_equal(up, x, image, configure)


def randomize_jbu(module: nn.Module, seed: int = 0, gate: float = 1.0) -> nn.Module:
    """Give every parameter of a JBU stack / stage non-trivial values (a trained-looking stack) without
    changing the layout; safe-start gates are set to ``gate`` (1: the bilateral kernel fully on, as far from
    the safe start as training goes). Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".gate"):
                p.fill_(gate)
            elif name.endswith("sigma_spatial"):
                p.copy_(0.5 + torch.rand((), generator=g))
            elif name.endswith("range_temp"):
                p.copy_(torch.rand((), generator=g) - 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()
