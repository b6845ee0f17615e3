"""featup.core: FeatUp's upsamplers, downsamplers, multi-view losses and training.

Every upsampler is called the same way: ``up(lr_feats, image, output_size=None) -> (B, C, H, W)``.
"""

from __future__ import annotations

# ruff: noqa: I001  (imports are grouped by module owner, not alphabetically)

from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError, CheckpointMixin, load_checkpoint, save_checkpoint
from featup.core.registry import create_upsampler, list_upsamplers, register_upsampler

# --- JBU stack, baselines, original weights, visualization (jbu.py, baselines.py, original.py, visualize.py)
from featup.core.baselines import (
    BicubicUpsampler,
    BilinearUpsampler,
    CARAFEUpsampler,
    ClassicJBU,
    NearestUpsampler,
    ResizeConvUpsampler,
    SAPAUpsampler,
)
from featup.core.jbu import JBUStack, JBUStage, stage_sizes
from featup.core.original import channel_norm, original_checkpoint_url, read_original_jbu
from featup.core.visualize import colorize, pca_rgb, salience_rgb, uncertainty_rgb

# --- implicit upsampler, downsamplers, jitter, losses, PCA, training (implicit.py, downsamplers.py, ...)
from featup.core.downsamplers import AttentionDownsampler, SimpleDownsampler, create_downsampler
from featup.core.implicit import ImplicitUpsampler
from featup.core.jitter import JitterParams, apply_jitter, sample_jitter
from featup.core.losses import UncertaintyHead, project, random_projection, reconstruction_loss, tv_loss
from featup.core.pca import PCA
from featup.core.implicit_fit import ImplicitFitConfig, fit_implicit
from featup.core.training import train_jbu
from featup.core.training_config import JBUTrainConfig

# --- scale: tiled inference, mixed precision (tiling.py, precision.py)
from featup.core.precision import PrecisionError, mixed_precision, precision_error, upsample_mixed
from featup.core.tiling import plan_tiles, tiled_upsample

__all__ = [
    "PrecisionError",
    "mixed_precision",
    "plan_tiles",
    "precision_error",
    "tiled_upsample",
    "upsample_mixed",
    "BicubicUpsampler",
    "BilinearUpsampler",
    "CARAFEUpsampler",
    "ClassicJBU",
    "JBUStack",
    "JBUStage",
    "NearestUpsampler",
    "ResizeConvUpsampler",
    "SAPAUpsampler",
    "channel_norm",
    "colorize",
    "original_checkpoint_url",
    "pca_rgb",
    "read_original_jbu",
    "salience_rgb",
    "stage_sizes",
    "uncertainty_rgb",
    "AttentionDownsampler",
    "SimpleDownsampler",
    "create_downsampler",
    "JitterParams",
    "apply_jitter",
    "sample_jitter",
    "UncertaintyHead",
    "project",
    "random_projection",
    "reconstruction_loss",
    "tv_loss",
    "PCA",
    "ImplicitUpsampler",
    "fit_implicit",
    "train_jbu",
    "ImplicitFitConfig",
    "JBUTrainConfig",
    "CheckpointError",
    "CheckpointMixin",
    "Upsampler",
    "create_upsampler",
    "list_upsamplers",
    "load_checkpoint",
    "register_upsampler",
    "save_checkpoint",
]
