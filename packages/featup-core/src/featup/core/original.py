"""Weights published by the original FeatUp project, loaded into :class:`featup.core.JBUStack`.

The original JBU checkpoints are Lightning ``.ckpt`` files whose ``state_dict`` holds ``model.*`` (backbone),
``upsampler.*``, and training-only ``scale_net.*`` / ``downsampler.*`` keys. The upsampler keys are

- ``up1`` .. ``up4``, each with ``range_temp`` (), ``sigma_spatial`` (), ``range_proj.0.{weight,bias}``
  (32, 3, 1, 1)/(32,), ``range_proj.3.{weight,bias}`` (32, 32, 1, 1)/(32,), ``fixup_proj.0.{weight,bias}``
  (49, 52, 1, 1)/(49,) and ``fixup_proj.3.{weight,bias}`` (49, 49, 1, 1)/(49,);
- ``fixup_proj.1.{weight,bias}`` (dim, dim, 1, 1)/(dim,): the final residual ``x + 0.1 * conv(x)``.

``JBUStack(dim, variant="original")`` has exactly these parameter names, so loading is a key-prefix strip plus a
strict shape check. Files are read with ``torch.load(weights_only=True)``; a Lightning file that also pickles
other objects is read with those objects replaced by inert stand-ins (``_inert_pickle``), so nothing from
the file is ever imported or executed.

The original models were trained on ImageNet-normalized 224 px images (``JBUStack(variant="original")`` normalizes
its [0, 1] guidance the same way) and, for the ``use_norm`` checkpoints, on features passed through a
LayerNorm over channels without affine parameters (:func:`channel_norm`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from featup.core import _inert_pickle
from featup.core.checkpoint import CheckpointError

__all__ = [
    "ORIGINAL_BACKBONES",
    "ORIGINAL_URL",
    "channel_norm",
    "original_checkpoint_url",
    "original_jbu_shapes",
    "read_original_jbu",
]

ORIGINAL_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
#: backbones with published JBU stacks (maskclip only without ``use_norm``)
ORIGINAL_BACKBONES = ("vit", "dino16", "clip", "dinov2", "resnet50", "maskclip")

_STAGE_SHAPES: dict[str, tuple[int, ...]] = {
    "range_temp": (),
    "sigma_spatial": (),
    "range_proj.0.weight": (32, 3, 1, 1),
    "range_proj.0.bias": (32,),
    "range_proj.3.weight": (32, 32, 1, 1),
    "range_proj.3.bias": (32,),
    "fixup_proj.0.weight": (49, 52, 1, 1),
    "fixup_proj.0.bias": (49,),
    "fixup_proj.3.weight": (49, 49, 1, 1),
    "fixup_proj.3.bias": (49,),
}
_IGNORED_PREFIXES = ("model.", "scale_net.", "downsampler.")


def original_checkpoint_url(name: str, use_norm: bool = True) -> str:
    """URL of the original project's JBU checkpoint for backbone ``name`` (for users with internet access)."""
    if name not in ORIGINAL_BACKBONES:
        raise ValueError(f"expected one of {ORIGINAL_BACKBONES}, got {name!r}")
    if name == "maskclip" and use_norm:
        raise ValueError("the original project published maskclip only without use_norm")
    folder = "" if use_norm else "no_norm/"
    return f"{ORIGINAL_URL}{folder}{name}_jbu_stack_cocostuff.ckpt"


def channel_norm(feats: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels without affine parameters (the original's ``use_norm``), per pixel.

    Shape:
        - feats: (B, C, h, w)
        - output: (B, C, h, w)
    """
    return F.layer_norm(feats.permute(0, 2, 3, 1), feats.shape[1:2]).permute(0, 3, 1, 2)


def original_jbu_shapes(feat_dim: int) -> dict[str, tuple[int, ...]]:
    """Every upsampler key of the original layout and its shape, for features of ``feat_dim`` channels."""
    shapes = {f"up{k}.{name}": shape for k in range(1, 5) for name, shape in _STAGE_SHAPES.items()}
    shapes["fixup_proj.1.weight"] = (feat_dim, feat_dim, 1, 1)
    shapes["fixup_proj.1.bias"] = (feat_dim,)
    return shapes


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"expected an original FeatUp checkpoint file at {path}, found none")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"corrupted checkpoint {path}: not a readable safetensors file ({exc})"
            ) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A Lightning .ckpt also pickles hyper-parameter objects that weights_only refuses; read it again
        # with every such class replaced by an inert stand-in (nothing from the file is imported or run).
        data = _load_inert(path)
    except Exception as exc:  # torch.load raises many types (RuntimeError, EOFError, zipfile errors, ...)
        raise CheckpointError(
            f"could not read {path} as a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"expected a checkpoint dict in {path}, got {type(data).__name__}")
    return data


def _load_inert(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)
    except Exception as exc:
        raise CheckpointError(
            f"could not read {path} as a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def read_original_jbu(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """Extract and validate the upsampler weights of an original FeatUp JBU checkpoint.

    Args:
        source: path to the Lightning ``.ckpt`` (or a ``.safetensors`` export), the loaded checkpoint dict,
            or its state dict; keys with or without the ``upsampler.`` prefix. ``model.*``, ``scale_net.*``
            and ``downsampler.*`` keys are ignored.

    Returns:
        (state dict with ``JBUStack(variant="original")`` key names, feature dimension)

    Raises:
        CheckpointError: unreadable input, missing or unexpected upsampler keys, wrong shapes, non-tensors.
    """
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        data: Mapping[str, Any] = _read_file(Path(source))
    elif isinstance(source, Mapping):
        where = "the given state dict"
        data = source
    else:
        raise TypeError(f"expected a path or a state dict, got {type(source).__name__}")
    if isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    prefixed = {k[len("upsampler.") :]: v for k, v in data.items() if k.startswith("upsampler.")}
    if prefixed:
        state = prefixed
    else:
        state = {k: v for k, v in data.items() if not k.startswith(_IGNORED_PREFIXES)}
    if "fixup_proj.1.weight" not in state:
        raise CheckpointError(
            f"{where} is not an original FeatUp JBU checkpoint: no 'fixup_proj.1.weight' "
            f"(found keys {sorted(data)[:8]}{' ...' if len(data) > 8 else ''})"
        )
    final = state["fixup_proj.1.weight"]
    if not isinstance(final, torch.Tensor) or final.dim() != 4 or final.shape[0] != final.shape[1]:
        got = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise CheckpointError(f"{where}: expected 'fixup_proj.1.weight' of shape (dim, dim, 1, 1), got {got}")
    feat_dim = int(final.shape[0])
    shapes = original_jbu_shapes(feat_dim)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not have the original JBU layout: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(
                f"{where}: expected a floating-point tensor for {key!r}, got {type(value).__name__}"
            )
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{where}: expected {key!r} of shape {shape}, got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: {key!r} holds non-finite values (corrupted weights)")
        out[key] = value.detach().to("cpu", torch.float32)
    return out, feat_dim
