"""Shared fixtures: offline environment and a cache of built backbones (building is the slow part)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may wait on the network

import functools

import pytest
import torch

from featup.backbones import Backbone, create_backbone

#: transformer depth of the numerically tested ViTs; full-depth architectures are checked on the meta device
#: (test_registry.py), numbers with two real blocks keep the suite fast on 2 shared CPU cores
VIT_TEST_DEPTH = 2


@functools.cache
def _cached(name: str) -> Backbone:
    torch.manual_seed(0)
    depth = 1 if ("vitl" in name or "vitg" in name) else VIT_TEST_DEPTH
    kwargs = {} if ("resnet" in name or "efficientnet" in name) else {"model_kwargs": {"depth": depth}}
    return create_backbone(name, **kwargs)


@pytest.fixture(scope="session")
def built():
    """``built(name)``: a shared pretrained=False backbone (ViTs with 1-2 blocks). Do not mutate it."""
    return _cached


@pytest.fixture
def image():
    """A deterministic RGB batch in [0, 1] of odd, non-square size."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 45, 61, generator=g)
