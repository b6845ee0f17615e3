"""Registry of backbones: ``register_backbone``, ``create_backbone``, ``list_backbones``, configs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from featup.backbones.base import Backbone
from featup.backbones.config import BackboneConfig
from featup.backbones.weights import read_state_dict, resolve_pretrained, unwrap_state_dict

__all__ = ["Builder", "create_backbone", "get_backbone_config", "list_backbones", "register_backbone"]

#: a builder turns a config plus keyword options into an (unweighted) Backbone
Builder = Callable[..., Backbone]

_REGISTRY: dict[str, tuple[BackboneConfig, Builder]] = {}


def register_backbone(config: BackboneConfig) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(config, **options) -> Backbone`` under ``config.name``.

    The builder constructs the architecture without weights; ``create_backbone`` loads weights and freezes.
    A Backbone whose weights can be loaded defines ``load_backbone_weights(state_dict)``. Decorators stack,
    so one builder can serve many configs.

    Example:
        >>> @register_backbone(BackboneConfig("my_net", "my_net", feat_dim=64, stride=4))
        ... def build(config, **kw):
        ...     return wrap_backbone(MyNet(), feat_dim=config.feat_dim, stride=config.stride,
        ...                          mean=config.mean, std=config.std, name=config.name, **kw)
    """
    if not isinstance(config, BackboneConfig):
        raise TypeError(f"expected a BackboneConfig, got {type(config).__name__}")

    def decorator(builder: Builder) -> Builder:
        if not callable(builder):
            raise TypeError(f"expected a builder callable, got {type(builder).__name__}")
        if config.name in _REGISTRY and _REGISTRY[config.name] != (config, builder):
            raise ValueError(f"backbone {config.name!r} is already registered")
        _REGISTRY[config.name] = (config, builder)
        return builder

    return decorator


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"dinov2*"``)."""
    import fnmatch

    names = sorted(_REGISTRY)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_backbone_config(name: str) -> BackboneConfig:
    """The :class:`BackboneConfig` registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list_backbones()}")
    return _REGISTRY[name][0]


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a registered backbone, frozen and in eval mode.

    Args:
        name: a name from :func:`list_backbones`, e.g. ``"dinov2_vits14"``.
        pretrained: load the published weights (from the local cache, or downloaded when online). Offline,
            fails within ``FEATUP_NETWORK_TIMEOUT`` seconds (3 by default; at once under ``HF_HUB_OFFLINE=1``)
            with a message naming the file to fetch.
        weights: a local ``.safetensors`` or torch weight file (read without unpickling objects) or a state
            dict; takes precedence over ``pretrained``. The authors' original formats are accepted for the
            timm models.
        **kwargs: backbone options, e.g. ``use_norm=True``, ``fit="pad"``, ``frozen=False``; for ViTs
            ``facet``, ``layer``, ``stride`` (Strided baseline), ``final_norm``, ``project``; for ResNets
            ``layer``; ``model_kwargs`` passes architecture overrides to timm/torchvision.

    Returns:
        A :class:`featup.backbones.Backbone`: ``bb(image)`` maps RGB (B,3,H,W) in [0,1] to (B,C,h,w).

    Raises:
        ValueError: unknown name or option, or weights that do not fit.
        WeightsUnavailableError: ``pretrained=True`` while offline and the weights are not cached.
    """
    config, builder = _REGISTRY.get(name, (None, None))
    if config is None or builder is None:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list_backbones()}")
    options = dict(config.defaults)
    for key, value in kwargs.items():
        if isinstance(value, Mapping) and isinstance(options.get(key), Mapping):
            options[key] = {**options[key], **value}  # model_kwargs merge with the config's own
        else:
            options[key] = value
    frozen = bool(options.pop("frozen", True))

    state = None
    if weights is not None:
        state = (
            unwrap_state_dict(weights, "weights")
            if isinstance(weights, Mapping)
            else read_state_dict(weights)
        )
    elif pretrained:
        # resolve before building: an offline failure must not wait for a large model's initialization
        state = read_state_dict(resolve_pretrained(config))

    bb = builder(config, frozen=frozen, **options)
    if not isinstance(bb, Backbone):
        raise TypeError(f"builder of {name!r} returned {type(bb).__name__}, expected a Backbone")
    if state is not None:
        loader = getattr(bb, "load_backbone_weights", None)
        if loader is None:
            raise ValueError(f"backbone {name!r} ({type(bb).__name__}) cannot load weights")
        loader(state)
    if frozen:
        bb.freeze_()
    return bb.eval()
