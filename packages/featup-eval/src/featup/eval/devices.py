"""Where evaluation and inference run: the one default every entry point and command shares.

Every evaluation, training and inference entry point takes ``device``; the commands' ``--device`` defaults
to :func:`default_device` (CUDA when available, else CPU), so a GPU machine uses its GPU without a flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "DEVICE_HELP",
    "add_device_argument",
    "command_device",
    "default_device",
    "loader_options",
    "module_device",
    "resolve_device",
    "to_device",
]

#: the help of every command's ``--device``
DEVICE_HELP = "torch device: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)"


def default_device() -> torch.device:
    """``cuda`` (torchrun's ``LOCAL_RANK`` GPU, else GPU 0) when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device`; None means :func:`default_device`.

    Raises:
        ValueError: a string that is not a torch device.
    """
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"expected a torch device such as cpu, cuda or cuda:1, got {device!r} ({exc})"
        ) from None


def loader_options(device: torch.device, num_workers: int = 0) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for feeding ``device``: pinned memory for CUDA (so the host-to-device
    copies can overlap), ``num_workers`` decoding processes (kept alive between epochs)."""
    if num_workers < 0:
        raise ValueError(f"expected num_workers >= 0, got {num_workers}")
    return {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": num_workers > 0,
    }


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of a collated batch moved to ``device`` (non-blocking from pinned memory)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def module_device(module: object, fallback: str | torch.device = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer; ``fallback`` for anything without tensors."""
    if isinstance(module, torch.nn.Module):
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device(fallback)


def add_device_argument(group: Any) -> None:
    """``--device`` (default :func:`default_device`, resolved by :func:`command_device`)."""
    group.add_argument("--device", default=None, metavar="DEVICE", help=DEVICE_HELP)


def command_device(args: Any) -> torch.device:
    """The device of a command: ``args.device`` checked (and stored back as a torch.device), else the default.

    Raises:
        ValueError: not a torch device, or a CUDA device on a machine without CUDA.
    """
    device = resolve_device(getattr(args, "device", None))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"expected a device this machine has: CUDA is not available, got --device {device}")
    args.device = device
    return device
