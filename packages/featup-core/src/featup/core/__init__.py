"""featup.core: FeatUp's upsamplers, downsamplers, multi-view losses and training.

Every upsampler is called the same way: ``up(lr_feats, image, output_size=None) -> (B, C, H, W)``.
"""

from __future__ import annotations

from featup.core.base import Upsampler
from featup.core.checkpoint import CheckpointError, CheckpointMixin, load_checkpoint, save_checkpoint
from featup.core.registry import create_upsampler, list_upsamplers, register_upsampler

# --- JBU stack, baselines, original weights, visualization (jbu.py, baselines.py, original.py, visualize.py)

# --- implicit upsampler, downsamplers, jitter, losses, PCA, training (implicit.py, downsamplers.py, ...)

# --- scale: tiled inference, mixed precision (tiling.py, precision.py)

__all__ = [
    "CheckpointError",
    "CheckpointMixin",
    "Upsampler",
    "create_upsampler",
    "list_upsamplers",
    "load_checkpoint",
    "register_upsampler",
    "save_checkpoint",
]
