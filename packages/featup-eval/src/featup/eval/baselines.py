"""Deprecated alias of :mod:`featup.eval.methods` (renamed: it holds the paper's Table 1 comparison methods,
not the upsampler baselines of :mod:`featup.core.baselines`)."""

from __future__ import annotations

import warnings

from featup.eval.methods import (
    METHODS,
    DIPNet,
    DIPUpsampler,
    FeatureMethod,
    MethodConfig,
    build_method,
    fit_dip,
    load_backbone,
    method_settings,
    parse_methods,
)

__all__ = [
    "METHODS",
    "DIPNet",
    "DIPUpsampler",
    "FeatureMethod",
    "MethodConfig",
    "build_method",
    "fit_dip",
    "load_backbone",
    "method_settings",
    "parse_methods",
]

warnings.warn(
    "featup.eval.baselines is renamed featup.eval.methods; the old name will be removed in a later release",
    DeprecationWarning,
    stacklevel=2,
)
