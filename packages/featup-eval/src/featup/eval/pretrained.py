"""The original FeatUp project's pretrained models, as a drop-in: ``load_pretrained("dino16")``.

Each model is our backbone (``featup.backbones``) plus the JBU stack the original project published for it,
loaded with :meth:`featup.core.JBUStack.from_original`. Like the original ``torch.hub`` models it has
``.model`` (the backbone, with the channel LayerNorm when ``use_norm``) and ``.upsampler``, and calling it
returns the upsampled features. Unlike them it takes RGB images in [0, 1] (normalization happens inside),
works at any image size, and comes back in eval mode.

Weights: the JBU checkpoint is read from ``checkpoint=PATH``, else from the cache folder
(``$FEATUP_CACHE`` or ``~/.cache/featup``), else downloaded from the original project's URL. Offline it fails
within seconds with the URL to fetch and how to pass the local file. The backbone's weights come from
``featup.backbones`` (its cache or the network), or from ``weights=PATH``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import nn

__all__ = ["PRETRAINED_NAMES", "PretrainedFeatUp", "PretrainedUnavailableError", "load_pretrained"]

#: the original project's torch.hub entry points
PRETRAINED_NAMES: tuple[str, ...] = ("vit", "dino16", "clip", "dinov2", "resnet50", "maskclip")


class PretrainedUnavailableError(RuntimeError):
    """A published checkpoint is neither cached nor downloadable (offline, or the server did not answer)."""


class PretrainedFeatUp(nn.Module):
    """A backbone and a JBU upsampler: ``model(image) -> high-res features``.

    Attributes:
        model: the backbone (``model(image) -> (B, C, h, w)``), as in the original hub models.
        upsampler: the :class:`~featup.core.JBUStack`.

    Shape:
        - image: (B, 3, H, W) RGB in [0, 1]
        - output: (B, C, H, W)
    """

    def __init__(self, model: nn.Module, upsampler: nn.Module, name: str = "") -> None:
        super().__init__()
        self.model = model
        self.upsampler = upsampler
        self.name = name

    @property
    def backbone(self) -> nn.Module:
        """Alias of ``model``."""
        return self.model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.model(image), image)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: ``$FEATUP_CACHE`` or ``~/.cache/featup``."""
    return Path(os.environ.get("FEATUP_CACHE", Path.home() / ".cache" / "featup"))


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes")
        for k in ("FEATUP_OFFLINE", "HF_HUB_OFFLINE")
    )


def _download(url: str, dest: Path, timeout: float) -> Path:
    """Fetch ``url`` to ``dest`` (temporary file + rename); fail fast when the host does not answer."""
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise PretrainedUnavailableError(f"{host} is unreachable ({exc.strerror or exc})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(url, timeout=max(timeout, 30)) as resp:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
        os.replace(tmp, dest)
    except OSError as exc:
        raise PretrainedUnavailableError(f"download failed ({exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _jbu_checkpoint(name: str, use_norm: bool, timeout: float) -> Path:
    from featup.core.original import original_checkpoint_url

    url = original_checkpoint_url(name, use_norm)
    cached = cache_dir() / ("" if use_norm else "no_norm") / Path(urllib.parse.urlparse(url).path).name
    if cached.is_file():
        return cached
    hint = (
        f"fetch {url} and pass it as checkpoint=PATH (command line: --checkpoint PATH), "
        f"or place it at {cached}"
    )
    if _offline():
        raise PretrainedUnavailableError(f"offline (HF_HUB_OFFLINE/FEATUP_OFFLINE set): {hint}")
    try:
        return _download(url, cached, timeout)
    except PretrainedUnavailableError as exc:
        raise PretrainedUnavailableError(
            f"cannot download the {name} JBU checkpoint: {exc}; {hint}"
        ) from None


def load_pretrained(
    name: str,
    use_norm: bool = True,
    weights: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    timeout: float = 3.0,
) -> PretrainedFeatUp:
    """One of the original project's models: our backbone plus its published JBU stack, in eval mode.

    Args:
        name: ``vit``, ``dino16``, ``clip``, ``dinov2``, ``resnet50`` or ``maskclip``.
        use_norm: apply the channel LayerNorm to the backbone's features (the original's ``use_norm``; its
            JBU checkpoints were trained with and without it; maskclip only without).
        weights: local backbone weights (``.safetensors`` or ``.pth``) instead of downloading them.
        checkpoint: local copy of the original JBU checkpoint (``.ckpt`` or a safetensors state dict).
        pretrained: False builds the same architecture with random weights and an untrained JBU (offline
            tests, shapes).
        timeout: seconds to wait for the download server before failing.

    Raises:
        ValueError: unknown name, or maskclip with ``use_norm=True``.
        PretrainedUnavailableError: the checkpoint is neither local nor downloadable (message has the URL).
        featup.core.CheckpointError: the checkpoint is not an original JBU stack for this backbone.
    """
    from featup.backbones import create_backbone
    from featup.backbones.models import ORIGINAL_HUB_NAMES
    from featup.core import CheckpointError, JBUStack

    if name not in PRETRAINED_NAMES:
        raise ValueError(f"unknown pretrained model {name!r}; expected one of {list(PRETRAINED_NAMES)}")
    if name == "maskclip" and use_norm:
        raise ValueError("the original project published maskclip only without use_norm: pass use_norm=False")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"JBU checkpoint not found: {checkpoint}")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    # the JBU file first: it is the part only this function can fetch, and failing on it is fastest
    if checkpoint is None and pretrained:
        checkpoint = _jbu_checkpoint(name, use_norm, timeout)
    backbone = create_backbone(
        ORIGINAL_HUB_NAMES[name],
        pretrained=pretrained and weights is None,
        weights=weights,
        use_norm=use_norm,
    )
    feat_dim = int(backbone.feat_dim)
    if checkpoint is not None:
        upsampler = JBUStack.from_original(checkpoint)
        if upsampler.feat_dim != feat_dim:
            raise CheckpointError(
                f"JBU checkpoint {checkpoint} is for {upsampler.feat_dim}-channel features; "
                f"the {name} backbone gives {feat_dim}"
            )
    else:
        upsampler = JBUStack(feat_dim, original=True)
    return PretrainedFeatUp(backbone, upsampler, name).eval()
