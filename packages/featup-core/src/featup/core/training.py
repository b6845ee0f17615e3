"""Training FeatUp upsamplers: the import path of :func:`train_jbu` and :func:`fit_implicit`.

The code lives in three modules: :mod:`featup.core.multiview` (the multi-view objective every trainer
shares: views, backbone, downsampler, loss, seeding, the step loop), :mod:`featup.core.jbu_training`
(``train_jbu``) and :mod:`featup.core.implicit_fit` (``fit_implicit``). This module re-exports their names
as they were importable before the split; assigning one of :data:`~featup.core.multiview.PATCHABLE`
(``sample_jitter``, ``reconstruction_loss``, ``create_downsampler``, ``make_grad_scaler``) here, as
``monkeypatch.setattr(training, ...)`` does, assigns it in :mod:`featup.core.multiview`, where every
trainer reads it.
"""

from __future__ import annotations

import sys
import types

# the names the single module used to import stay importable from it (code written against it reads them)
from featup.core import _distributed as dist_utils
from featup.core import multiview as _multiview
from featup.core._checks import check_bool as _check_bool
from featup.core._checks import check_float as _check_float
from featup.core._checks import check_int as _check_int
from featup.core._checks import check_probability as _check_probability
from featup.core._train_data import derive_seed, make_source, validate_images
from featup.core._train_state import (
    check_hparams,
    check_precision,
    load_train_state,
    restore_grad_scaler,
    restore_modules,
    restore_optimizer,
    save_train_state,
)
from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError
from featup.core.downsamplers import AttentionDownsampler, window_pool
from featup.core.implicit_fit import ImplicitFitConfig, fit_implicit
from featup.core.jbu import JBUStack
from featup.core.jbu_training import (
    JBU_MODEL_FILE,
    JBU_STATE_FILE,
    JBUTrainConfig,
    _batched_features,
    _config_of,
    _JBUObjective,
    _param_groups,
    _saved_kwargs,
    _train_jbu,
    channel_linear,
    train_jbu,
)
from featup.core.jitter import JitterParams, apply_jitter
from featup.core.losses import UncertaintyHead, project, random_projection
from featup.core.multiview import Callback
from featup.core.multiview import backbone_features as _features
from featup.core.multiview import check_finite_features as _check_finite_features
from featup.core.multiview import check_finite_loss as _check_finite_loss
from featup.core.multiview import forked_devices as _forked_devices
from featup.core.multiview import frozen as _frozen
from featup.core.multiview import resolve_device as _resolve_device
from featup.core.multiview import seed_rngs as _seed_rngs
from featup.core.multiview import step_logs as _step_logs
from featup.core.multiview import training_context as _training_context
from featup.core.precision import full_precision, mixed_precision, to_float32

__all__ = [
    "JBU_MODEL_FILE",
    "JBU_STATE_FILE",
    "Callback",
    "ImplicitFitConfig",
    "JBUTrainConfig",
    "channel_linear",
    "fit_implicit",
    "train_jbu",
]

# names kept for code written against the single module (they are the same objects)
_COMPAT = (
    AttentionDownsampler,
    CheckpointError,
    JBUStack,
    JitterParams,
    UncertaintyHead,
    Upsampler,
    apply_jitter,
    check_hparams,
    check_precision,
    derive_seed,
    dist_utils,
    full_precision,
    load_train_state,
    make_source,
    mixed_precision,
    project,
    random_projection,
    restore_grad_scaler,
    restore_modules,
    restore_optimizer,
    save_train_state,
    to_float32,
    validate_images,
    window_pool,
    _train_jbu,
    _batched_features,
    _check_bool,
    _check_finite_features,
    _check_finite_loss,
    _check_float,
    _check_int,
    _check_probability,
    _config_of,
    _features,
    _forked_devices,
    _frozen,
    _JBUObjective,
    _param_groups,
    _train_jbu,
    _resolve_device,
    _saved_kwargs,
    _seed_rngs,
    _step_logs,
    _training_context,
)


def _forwarded(name: str) -> property:
    """A module attribute that reads, assigns and deletes ``featup.core.multiview.<name>``."""
    return property(
        lambda self: getattr(_multiview, name),
        lambda self, value: setattr(_multiview, name, value),
        lambda self: delattr(_multiview, name),
        doc=f"featup.core.multiview.{name}",
    )


# data descriptors on the module's class, so monkeypatch.setattr/undo (which restores a module's __dict__
# entry unless a data descriptor is in the way) and plain assignment both reach featup.core.multiview
_ForwardingModule = type(
    "_ForwardingModule", (types.ModuleType,), {name: _forwarded(name) for name in _multiview.PATCHABLE}
)
sys.modules[__name__].__class__ = _ForwardingModule
