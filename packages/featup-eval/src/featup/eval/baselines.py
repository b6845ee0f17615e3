"""Deprecated alias of :mod:`featup.eval.methods` (renamed: it holds the paper's Table 1 comparison methods,
not the upsampler baselines of :mod:`featup.core.baselines`)."""

from __future__ import annotations

import warnings

from featup.eval import methods as _methods
from featup.eval.methods import *  # noqa: F403 (the alias re-exports the module's public names)

__all__ = list(_methods.__all__)

warnings.warn(
    "featup.eval.baselines is renamed featup.eval.methods; the old name will be removed in a later release",
    DeprecationWarning,
    stacklevel=2,
)
