"""Resumable training state in one safetensors checkpoint (through :mod:`featup.core.checkpoint`).

Tensors: every trainable module's state under ``<name>.<key>`` and the optimizer's per-parameter state
under ``optimizer.<index>.<key>``. Config (JSON, in the safetensors header and beside it): the kind of
run, the number of completed steps, the hyperparameters that define the run, the modules' constructor
configs, the optimizer's param groups and non-tensor state, the seed scheme, and the training precision
with the float16 gradient scaler's state. Random numbers in the
training loops are keyed by ``(seed, rank, step)``, so the step count *is* the RNG state: a resumed run
draws exactly the numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featup.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "TRAIN_FORMAT",
    "check_hparams",
    "check_precision",
    "load_train_state",
    "restore_grad_scaler",
    "restore_modules",
    "restore_optimizer",
    "save_train_state",
]

TRAIN_FORMAT = "featup-train-state/1"
RNG_SCHEME = "blake2b(seed:rank:step:purpose)/1"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state in {path} does not match this run: {exc}") from None


def save_train_state(
    path: str | os.PathLike,
    *,
    kind: str,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
) -> Path:
    """Write the full training state atomically; returns the ``.safetensors`` path."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    cfg = {
        "format": TRAIN_FORMAT,
        "kind": kind,
        "step": int(step),
        "rng_scheme": RNG_SCHEME,
        "optimizer": opt_meta,
        **config,
    }
    return save_checkpoint(path, tensors, cfg)


def load_train_state(
    path: str | os.PathLike, kind: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a training state written by :func:`save_train_state` for a run of ``kind``."""
    tensors, cfg = load_checkpoint(path, map_location)
    if cfg.get("format") != TRAIN_FORMAT or cfg.get("kind") != kind:
        raise CheckpointError(
            f"expected a {kind} training-state checkpoint ({TRAIN_FORMAT}) at {path}, "
            f"got format={cfg.get('format')!r} kind={cfg.get('kind')!r}"
        )
    if cfg.get("rng_scheme") != RNG_SCHEME:
        raise CheckpointError(
            f"checkpoint {path} uses RNG scheme {cfg.get('rng_scheme')!r}, expected {RNG_SCHEME}"
        )
    return tensors, cfg


def restore_modules(
    tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module], path: str | os.PathLike
) -> None:
    """Load each module's ``<name>.*`` tensors strictly; a mismatch is a :class:`CheckpointError`."""
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path}: {name} does not match: {exc}") from None


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    path: str | os.PathLike,
) -> None:
    """Load the optimizer state saved by :func:`save_train_state`."""
    _restore_optimizer(optimizer, tensors, cfg["optimizer"], Path(path))


def check_hparams(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume a run whose defining hyperparameters differ from the checkpoint's."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the run's hyperparameters differ ({'; '.join(diffs)}); "
            "use another checkpoint location or resume=False"
        )


def check_precision(cfg: dict[str, Any], precision: str, path: str | os.PathLike) -> None:
    """Refuse to resume a run in another precision than the one it was trained in.

    Refusing loses nothing: the checkpoint is untouched and the message names the value that continues
    it. Switching silently would break the exact-resume guarantee, and a float16 run's loss scale would
    not carry over. States saved before the option existed were trained in float32.
    """
    saved = cfg.get("precision", "float32")
    if saved != precision:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with precision={saved!r}, this run asks for "
            f"precision={precision!r}; pass precision={saved!r} to continue it, or resume=False / another "
            "checkpoint location to start over"
        )


def restore_grad_scaler(scaler: torch.amp.GradScaler, cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Load the loss scale and growth tracker saved with a float16 run (no-op for a disabled scaler)."""
    if not scaler.is_enabled():
        return
    state = cfg.get("grad_scaler") or {}
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no gradient-scaler state for its float16 run")
    scaler.load_state_dict(state)
