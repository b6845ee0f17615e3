"""Registry of upsamplers: ``register_upsampler``, ``create_upsampler``, ``list_upsamplers``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["create_upsampler", "list_upsamplers", "register_upsampler"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_upsampler(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory (or Upsampler class) under ``name``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"upsampler {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_upsamplers() -> list[str]:
    """Names accepted by ``create_upsampler``, sorted."""
    return sorted(_REGISTRY)


def create_upsampler(name: str, **kwargs) -> nn.Module:
    """Build a registered upsampler in eval mode; every one is called as ``up(lr_feats, image, output_size)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown upsampler {name!r}; expected one of {list_upsamplers()}")
    return _REGISTRY[name](**kwargs).eval()
