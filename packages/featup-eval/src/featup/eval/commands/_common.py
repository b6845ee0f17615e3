"""What ``featup upsample``, ``similarity`` and ``demo`` share: backbone and upsampler options,
featurizing."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from featup.eval.devices import add_device_argument, command_device
from featup.eval.errors import UsageError

__all__ = ["SYNTHETIC_BACKBONES", "Featurizer", "add_model_options", "build_featurizer", "resolve_backbone"]

#: offline backbones: the synthetic benchmark's extractors (no weights needed)
SYNTHETIC_BACKBONES = {"synthetic_a": "a", "synthetic_b": "b"}


def add_model_options(p: argparse.ArgumentParser, *, default_upsampler: str | None = None) -> None:
    """--backbone/--weights/--pretrained/--no-norm/--upsampler/--checkpoint/--steps/--size/--device."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--backbone",
        metavar="NAME",
        help="backbone name from featup.backbones (e.g. dinov2_vits14), or synthetic_a / synthetic_b "
        "(offline extractors of the synthetic benchmark)",
    )
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="local backbone weights (.safetensors or .pth) instead of downloading them",
    )
    g.add_argument(
        "--pretrained",
        metavar="NAME",
        help="a backbone with its pretrained JBU: efficientnet_lite0 (shipped, offline), or the original "
        "project's vit, dino16, clip, dinov2, resnet50, maskclip (downloaded; --checkpoint gives a local copy)",
    )
    g.add_argument("--no-norm", action="store_true", help="with --pretrained: the models without use_norm")
    g.add_argument(
        "--upsampler",
        default=default_upsampler,
        metavar="NAME",
        help="jbu (needs --checkpoint or --pretrained), implicit (fitted per image), or a baseline: "
        "bilinear, nearest, bicubic, jbu_classic, ... (default: jbu with a checkpoint or "
        "--pretrained, else implicit)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="trained upsampler (featup train-jbu output, a saved implicit model, or an original "
        "FeatUp .ckpt)",
    )
    g.add_argument("--steps", type=int, default=300, help="fit_implicit steps per image (default 300)")
    g.add_argument("--size", metavar="HxW", help="resize images to HxW before featurizing (default: keep)")
    add_device_argument(g)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def resolve_backbone(name: str | None, weights: str | None, device: str = "cpu") -> nn.Module:
    """A backbone by name: a synthetic extractor, or ``featup.backbones.create_backbone``."""
    if name is None:
        raise UsageError("expected --backbone NAME (or --pretrained NAME); e.g. --backbone dinov2_vits14")
    if name in SYNTHETIC_BACKBONES:
        from featup.eval.synthetic import SyntheticExtractor

        if weights:
            raise UsageError(f"--backbone {name} is a fixed synthetic extractor: it takes no --weights")
        return SyntheticExtractor(SYNTHETIC_BACKBONES[name]).to(device)
    try:
        from featup.backbones import create_backbone, list_backbones
    except ImportError as exc:  # pragma: no cover - featup-backbones is a dependency
        raise UsageError(f"featup.backbones is not installed ({exc})") from None
    known = list_backbones()
    if name not in known:
        raise UsageError(f"unknown backbone {name!r}; expected one of {[*known, *SYNTHETIC_BACKBONES]}")
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"weights file not found: {weights}")
    return create_backbone(name, pretrained=weights is None, weights=weights).to(device).eval()


@dataclass
class Featurizer:
    """A backbone plus an upsampler choice; ``__call__(image) -> (lr, hr)``."""

    backbone: nn.Module
    upsampler_name: str
    upsampler: nn.Module | None  # None for "implicit" without a checkpoint: fitted per image
    steps: int
    progress: bool
    guidance_norm: bool = False

    def lowres(self, image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.backbone(image)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: image (1, 3, H, W) in [0, 1] -> lr (1, C, h, w), hr (1, C, H, W)."""
        lr = self.lowres(image)
        if self.upsampler_name == "implicit" and self.upsampler is None:
            from featup.core.training import fit_implicit

            imp = fit_implicit(
                self.backbone, image, steps=self.steps, progress=self.progress, device=image.device
            )
            with torch.inference_mode():
                return lr, imp.render(tuple(image.shape[-2:]))
        with torch.inference_mode():
            return lr, self.upsampler(lr, image)

    def bilinear(self, lr: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(lr, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)


def _load_upsampler(name: str, checkpoint: str, feat_dim: int) -> nn.Module:
    """A trained upsampler from ``checkpoint`` (our format, or an original FeatUp ``.ckpt`` for jbu)."""
    from featup.core import CheckpointError, create_upsampler, load_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if name == "implicit":
        from featup.core.implicit import ImplicitUpsampler

        return ImplicitUpsampler.load(path)
    if path.suffix in (".ckpt", ".pth", ".pt"):
        if name != "jbu":
            raise UsageError(f"{path} looks like an original FeatUp checkpoint: use it with --upsampler jbu")
        from featup.core import JBUStack

        return JBUStack.from_original(path)
    tensors, cfg = load_checkpoint(path)
    wrong = f"checkpoint {path} holds a {cfg.get('class')!r}, not a {name!r} upsampler"
    kwargs = cfg.get("kwargs", {})
    if (
        cfg.get("class") == "JBUStack"
    ):  # its saved layout flags become variant= (options it predates filled in)
        from featup.core import JBUStack

        kwargs = JBUStack.kwargs_from_config(kwargs)
    try:
        up = create_upsampler(name, **kwargs)
    except TypeError:
        raise CheckpointError(wrong) from None
    if cfg.get("class") != type(up).__name__:
        raise CheckpointError(f"{wrong} ({type(up).__name__})")
    try:
        up.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match {type(up).__name__}: {exc}") from None
    fd = getattr(up, "feat_dim", None)
    if fd is not None and fd != feat_dim:
        raise CheckpointError(
            f"checkpoint {path} expects {fd}-channel features; the backbone gives {feat_dim}"
        )
    return up.eval()


def build_featurizer(args: argparse.Namespace) -> Featurizer:
    """Backbone and upsampler from the parsed model options."""
    from featup.core import create_upsampler, list_upsamplers

    progress = not getattr(args, "no_progress", False)
    command_device(args)
    if args.steps < 1:
        raise UsageError(f"expected --steps >= 1, got {args.steps}")
    if args.pretrained:
        from featup.eval.pretrained import load_pretrained

        if args.backbone:
            raise UsageError("--pretrained brings its own backbone: drop --backbone")
        if args.upsampler not in (None, "jbu"):
            raise UsageError(f"--pretrained provides a JBU upsampler; got --upsampler {args.upsampler}")
        model = load_pretrained(
            args.pretrained, use_norm=not args.no_norm, weights=args.weights, checkpoint=args.checkpoint
        ).to(args.device)
        return Featurizer(model.backbone, "jbu", model.upsampler, args.steps, progress)
    backbone = resolve_backbone(args.backbone, args.weights, args.device)
    name = args.upsampler or ("jbu" if args.checkpoint else "implicit")
    if name not in (*list_upsamplers(), "implicit"):
        raise UsageError(
            f"unknown upsampler {name!r}; expected one of {sorted({*list_upsamplers(), 'implicit'})}"
        )
    feat_dim = int(getattr(backbone, "feat_dim", 0) or 0)
    if args.checkpoint:
        return Featurizer(
            backbone, name, _load_upsampler(name, args.checkpoint, feat_dim), args.steps, progress
        )
    if name == "implicit":
        return Featurizer(backbone, name, None, args.steps, progress)
    if name == "jbu":
        raise UsageError(
            "--upsampler jbu needs trained weights: --checkpoint PATH (from `featup train-jbu`) or "
            "--pretrained NAME; or use --upsampler implicit"
        )
    up = create_upsampler(name)
    if any(True for _ in up.parameters()):
        raise UsageError(f"--upsampler {name} is learnable: pass its trained weights with --checkpoint PATH")
    return Featurizer(backbone, name, up.to(args.device), args.steps, progress)


def unique_stems(paths: list[str]) -> list[str]:
    """File stems, made unique (``a``, ``a-2``) so two inputs never overwrite each other's outputs."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")
