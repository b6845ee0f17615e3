"""Checkpoints: safetensors weights with the JSON config in their header and beside them, written atomically.

A checkpoint ``model.safetensors`` holds the tensors and, in its metadata, the JSON config; ``model.json``
beside it repeats the config for people and tools. Loading reads only the safetensors file, so the pair can
never disagree, and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["CheckpointError", "CheckpointMixin", "atomic_write_bytes", "load_checkpoint", "save_checkpoint"]

FORMAT = "featup-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match the module it is loaded into."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_suffix(path.suffix + ".safetensors")


def save_checkpoint(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Save tensors and a JSON-serialisable config; returns the ``.safetensors`` path written."""
    weights = _weights_path(path)
    text = json.dumps(config, sort_keys=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(weights, st_save(tensors, metadata={"format": FORMAT, "config": text}))
    atomic_write_bytes(
        weights.with_suffix(".json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    )
    return weights


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, config)`` saved by :func:`save_checkpoint`; raises :class:`CheckpointError`."""
    weights = _weights_path(path)
    if not weights.is_file():
        raise CheckpointError(f"expected a checkpoint file at {weights}, found none")
    data = weights.read_bytes()
    try:
        tensors = st_load(data)
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"corrupted checkpoint {weights}: not a readable safetensors file ({exc})"
        ) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"expected a FeatUp checkpoint ({FORMAT}) at {weights}, got metadata {sorted(meta)}"
        )
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupted checkpoint {weights}: config is not JSON ({exc})") from None
    return {k: v.to(map_location) for k, v in tensors.items()}, config


M = TypeVar("M", bound="CheckpointMixin")


class CheckpointMixin:
    """``save(path)`` / ``cls.load(path)`` for modules whose ``config()`` returns their constructor kwargs."""

    def config(self) -> dict[str, Any]:  # pragma: no cover - provided by the module
        raise NotImplementedError

    @classmethod
    def kwargs_from_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from a saved ``config()``; modules whose options grew override this."""
        return dict(kwargs)

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the weights and config atomically; ``extra`` is stored under ``config['extra']``."""
        cfg = {"class": type(self).__name__, "kwargs": self.config(), "extra": extra or {}}
        return save_checkpoint(path, self.state_dict(), cfg)  # type: ignore[attr-defined]

    @classmethod
    def load(cls: type[M], path: str | os.PathLike, map_location: str | torch.device = "cpu") -> M:
        """Rebuild the module from a checkpoint, in eval mode."""
        tensors, cfg = load_checkpoint(path, map_location)
        if cfg.get("class") != cls.__name__:
            raise CheckpointError(
                f"expected a {cls.__name__} checkpoint, got one saved from {cfg.get('class')!r} ({path})"
            )
        module = cls(**cls.kwargs_from_config(cfg.get("kwargs", {})))
        try:
            module.load_state_dict(tensors, strict=True)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not match {cls.__name__}: {exc}") from None
        return module.to(map_location).eval()  # type: ignore[attr-defined]
