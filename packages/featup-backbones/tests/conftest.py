"""Shared fixtures: offline environment and a cache of built backbones (building is the slow part)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may wait on the network

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from featup.backbones import Backbone, create_backbone  # noqa: E402

#: too slow to build and run at full depth on a 2-core CPU: built on the meta device, run with depth 1
HEAVY = ("dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vitg14", "dinov2_vitg14_reg")


@functools.lru_cache(maxsize=None)
def _cached(name: str, depth: int | None) -> Backbone:
    torch.manual_seed(0)
    kwargs = {} if depth is None else {"model_kwargs": {"depth": depth}}
    return create_backbone(name, **kwargs)


@pytest.fixture(scope="session")
def built():
    """``built(name)``: a shared pretrained=False backbone (depth 1 for the heavy models). Do not mutate."""

    def get(name: str) -> Backbone:
        return _cached(name, 1 if name in HEAVY else None)

    return get


@pytest.fixture
def image():
    """A deterministic RGB batch in [0, 1] of odd, non-square size."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 45, 61, generator=g)
