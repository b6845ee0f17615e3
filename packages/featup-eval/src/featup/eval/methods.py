"""The paper's Table 1 methods, each turned into one call ``method(image) -> features at image resolution``.

Methods (names as accepted by the commands, in the paper's row order):

==============  ====================================================================================
``lowres``      the backbone's features, nearest-neighbour enlarged (a frozen linear probe applied to them
                equals the low-res prediction enlarged, so every method is scored on the same pixels)
``bilinear``    bilinear interpolation of the features
``resize_conv`` learnable resize-conv, trained with FeatUp's multi-view loss (``train_jbu``)
``dip``         Deep Image Prior: a per-image conv net from fixed noise to high-res features, fitted with the
                same multi-view loss as FeatUp's implicit upsampler (:func:`fit_dip`)
``strided``     the backbone with its patch stride divided by ``strided_factor`` (positional embeddings
                interpolated by the backbone adapter), features bilinearly resized to image resolution
``large_image`` the backbone run on the image enlarged ``large_factor`` times, features resized likewise
``carafe``      CARAFE, trained with the multi-view loss
``sapa``        SAPA, trained with the multi-view loss
``jbu``         FeatUp (JBU): ``JBUStack`` trained with ``train_jbu`` (or loaded with ``jbu_checkpoint``)
``implicit``    FeatUp (Implicit): ``fit_implicit`` per image
==============  ====================================================================================

The learned upsamplers are trained once on the training split and saved under ``work_dir/upsamplers`` so a
rerun loads them instead of training again (and an interrupted training resumes from its checkpoint).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from featup.core import Upsampler, create_upsampler
from featup.core.checkpoint import CheckpointError

__all__ = [
    "METHODS",
    "DIPNet",
    "DIPUpsampler",
    "FeatureMethod",
    "MethodConfig",
    "build_method",
    "fit_dip",
    "load_backbone",
    "method_settings",
    "parse_methods",
]

#: method name -> row label, in the paper's Table 1 order
METHODS: dict[str, str] = {
    "lowres": "Low-res",
    "bilinear": "Bilinear",
    "resize_conv": "Resize-conv",
    "dip": "DIP",
    "strided": "Strided",
    "large_image": "Large image",
    "carafe": "CARAFE",
    "sapa": "SAPA",
    "jbu": "FeatUp (JBU)",
    "implicit": "FeatUp (Implicit)",
}

_TRAINED = ("resize_conv", "carafe", "sapa", "jbu")


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """``"bilinear,jbu"`` or a list -> names in Table 1 order; None or "all" -> all; bilinear always added."""
    if text is None or text == "all" or (not isinstance(text, str) and list(text) == ["all"]):
        return list(METHODS)
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; expected names from {', '.join(METHODS)} or 'all'")
    chosen = set(names) | {"bilinear"}  # the reference row is always re-run beside every method
    return [n for n in METHODS if n in chosen]


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """A frozen backbone in eval mode from a registry name or a ``module.path:factory`` spec.

    ``module.path:factory`` imports ``factory`` and calls it with ``kwargs`` (so ``stride=`` reaches it for
    the strided baseline); ``weights`` is then a safetensors state dict loaded strictly. Any other name goes
    to ``featup.backbones.create_backbone(name, pretrained=..., weights=..., **kwargs)``.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import backbone factory {name!r}: {exc}") from None
        model = factory(**kwargs)
        if weights is not None:
            from safetensors.torch import load_file

            try:
                state = load_file(str(weights))
            except Exception as exc:
                raise OSError(f"cannot read backbone weights {weights}: {exc}") from None
            model.load_state_dict(state, strict=True)
    else:
        from featup.backbones import create_backbone

        model = create_backbone(name, pretrained=pretrained, weights=weights, **kwargs)
    if isinstance(model, nn.Module):
        model.eval().requires_grad_(False)
    return model


@dataclass
class MethodConfig:
    """Settings of the Table 1 methods (paper values by default; tests and quick runs shrink the steps).

    Attributes:
        train_steps: ``train_jbu`` steps for the learned upsamplers (resize-conv, CARAFE, SAPA, JBU).
        batch_size: images per training step.
        implicit_steps: ``fit_implicit`` steps per image.
        dip_steps: :func:`fit_dip` steps per image.
        n_jitters: jittered views per step for the per-image fits.
        strided_factor: patch-stride divisor of the strided baseline (8: 16 px -> 2 px for ViT-S/16).
        large_factor: image enlargement of the large-image baseline.
        jbu_checkpoint: a trained ``JBUStack`` to load instead of training one.
        seed: seed of every training run.
    """

    train_steps: int = 2000
    batch_size: int = 4
    implicit_steps: int = 2000
    dip_steps: int = 2000
    n_jitters: int = 10
    strided_factor: int = 8
    large_factor: int = 8
    jbu_checkpoint: str | None = None
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def method_settings(name: str, cfg: MethodConfig) -> dict[str, Any]:
    """The part of ``cfg`` that changes ``name``'s output (a stored result is reused only if it matches)."""
    keys = {
        "strided": ("strided_factor",),
        "large_image": ("large_factor",),
        "implicit": ("implicit_steps", "n_jitters", "seed"),
        "dip": ("dip_steps", "n_jitters", "seed"),
        "jbu": ("train_steps", "batch_size", "seed", "jbu_checkpoint"),
    }.get(name, ("train_steps", "batch_size", "seed") if name in _TRAINED else ())
    return {k: getattr(cfg, k) for k in keys}


class FeatureMethod:
    """One Table 1 row: ``method(image) -> (B, C, H, W)`` features at the image's resolution.

    Shape:
        - image: (B, 3, H, W) RGB in [0, 1]
        - output: (B, C, H, W)
    """

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.name, self.label, self._fn = name, METHODS.get(name, name), fn

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self._fn(image)

    def __repr__(self) -> str:
        return f"FeatureMethod({self.name!r})"


class _ImagesOnly(Dataset):
    """A dict-sample dataset seen as a dataset of images, the form ``train_jbu`` reads."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index]["image"]


def _resize(feats: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(feats.shape[-2:]) == tuple(size):
        return feats
    if mode == "nearest":
        return F.interpolate(feats, size=tuple(size), mode="nearest-exact")
    return F.interpolate(feats, size=tuple(size), mode=mode, align_corners=False)


def _trained_upsampler(
    name: str,
    backbone: Callable,
    feat_dim: int,
    train_data: Dataset | None,
    cfg: MethodConfig,
    work_dir: Path,
    progress: bool,
    device: torch.device,
) -> Upsampler:
    from featup.core.training import train_jbu

    if name == "jbu" and cfg.jbu_checkpoint is not None:
        from featup.core import JBUStack

        path = Path(cfg.jbu_checkpoint)
        if path.suffix == ".ckpt":  # a checkpoint of the original project
            return JBUStack.from_original(path).to(device).eval()
        return JBUStack.load(path).to(device).eval()
    factory_kwargs = {} if name == "jbu" else {"feat_dim": feat_dim}
    # initial weights from the run's seed, not from whatever the global generator did before (a rerun, or
    # the same run on another device, must start from the same weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        up = create_upsampler(name, **factory_kwargs)
    final = work_dir / "upsamplers" / f"{name}.safetensors"
    settings = {"steps": cfg.train_steps, "batch_size": cfg.batch_size, "seed": cfg.seed}
    if final.is_file():
        from featup.core.checkpoint import load_checkpoint

        if load_checkpoint(final)[1].get("extra") == settings:
            try:
                return type(up).load(final).to(device).eval()
            except CheckpointError as exc:
                raise CheckpointError(f"cannot reuse {final} (delete it to retrain): {exc}") from None
    if train_data is None:
        raise ValueError(f"method {name!r} needs training images, got none")
    up = train_jbu(
        backbone,
        _ImagesOnly(train_data),
        cfg.train_steps,
        upsampler=up,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        checkpoint_dir=work_dir / "upsamplers" / f"{name}-train",
        checkpoint_every=max(1, min(100, cfg.train_steps)),
        resume=True,
        progress=progress,
        device=device,
    )
    up.save(final, extra=settings)
    return up.to(device).eval()


def _fit_per_image(
    x: torch.Tensor,
    fit: Callable[[torch.Tensor], Any],
    apply: Callable[[Any, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-image methods (implicit, DIP): ``fit`` a model to each image of ``x`` (with gradients on, whatever
    the caller's mode), ``apply`` it to that image, and stack the results (B, C, H, W)."""
    outs = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        with torch.enable_grad():
            model = fit(xi)
        outs.append(apply(model, xi))
    return torch.cat(outs)


def build_method(
    name: str,
    backbone: Callable[[torch.Tensor], torch.Tensor],
    *,
    feat_dim: int,
    cfg: MethodConfig | None = None,
    train_data: Dataset | None = None,
    backbone_factory: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None,
    backbone_stride: int | None = None,
    work_dir: str | os.PathLike = ".",
    progress: bool = False,
    device: str | torch.device | None = None,
) -> FeatureMethod:
    """Build (training if needed) one Table 1 method for ``backbone``.

    Args:
        name: a key of :data:`METHODS`.
        backbone: frozen feature extractor ``(B,3,H,W) -> (B,C,h,w)``.
        feat_dim: channels C of the backbone's features.
        cfg: method settings.
        train_data: dict-sample dataset whose ``"image"`` entries train the learned upsamplers.
        backbone_factory: ``factory(stride=s)`` rebuilding the backbone with patch stride ``s`` (strided).
        backbone_stride: the backbone's stride (strided).
        work_dir: where trained upsamplers are stored and resumed.
        progress: show progress bars.
        device: where the method's models live, train and run (default: the backbone's device); the
            method is then called with images on that device.
    """
    from featup.eval.devices import module_device

    cfg = cfg or MethodConfig()
    device = module_device(backbone) if device is None else torch.device(device)
    work_dir = Path(work_dir)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")

    if name == "lowres":
        return FeatureMethod(name, lambda x: _resize(backbone(x), x.shape[-2:], "nearest"))
    if name == "bilinear":
        return FeatureMethod(name, lambda x: _resize(backbone(x), x.shape[-2:]))
    if name == "large_image":
        factor = cfg.large_factor

        def large(x: torch.Tensor) -> torch.Tensor:
            big = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False).clamp_(0, 1)
            return _resize(backbone(big), x.shape[-2:])

        return FeatureMethod(name, large)
    if name == "strided":
        if backbone_factory is None or backbone_stride is None:
            raise ValueError(
                "the strided baseline needs a backbone factory taking stride= and the backbone's stride"
            )
        if backbone_stride % cfg.strided_factor != 0:
            raise ValueError(
                f"expected strided_factor to divide the backbone stride {backbone_stride}, "
                f"got {cfg.strided_factor}"
            )
        strided = backbone_factory(stride=backbone_stride // cfg.strided_factor)
        if isinstance(strided, nn.Module):
            strided = strided.to(device)
        return FeatureMethod(name, lambda x: _resize(strided(x), x.shape[-2:]))
    if name in _TRAINED:
        up = _trained_upsampler(name, backbone, feat_dim, train_data, cfg, work_dir, progress, device)
        return FeatureMethod(name, lambda x: up(backbone(x), x))
    if name == "implicit":
        from featup.core.training import fit_implicit

        def implicit(x: torch.Tensor) -> torch.Tensor:
            return _fit_per_image(
                x,
                lambda xi: fit_implicit(
                    backbone,
                    xi,
                    cfg.implicit_steps,
                    n_jitters=cfg.n_jitters,
                    seed=cfg.seed,
                    progress=False,
                    device=device,
                ),  # fmt: skip
                lambda imp, xi: imp.render(tuple(xi.shape[-2:])).to(xi.device),
            )

        return FeatureMethod(name, implicit)

    # dip
    def dip(x: torch.Tensor) -> torch.Tensor:
        return _fit_per_image(
            x,
            lambda xi: fit_dip(
                backbone,
                xi,
                cfg.dip_steps,
                n_jitters=cfg.n_jitters,
                seed=cfg.seed,
                progress=False,
                device=device,
            ),
            lambda up, xi: up(backbone(xi), xi),
        )

    return FeatureMethod(name, dip)


# ----------------------------------------------------------------------------------------------------------
# Deep Image Prior baseline


class _Down(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.GroupNorm(1, c_out),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode="reflect"),
            nn.GroupNorm(1, c_out),
            nn.LeakyReLU(0.2),
        )


class DIPNet(nn.Module):
    """Ulyanov et al.'s encoder-decoder with skip connections: noise code -> ``out_dim``-channel map.

    Strided-conv encoder, bilinear-upsampling decoder, 1x1 skip branches, LeakyReLU, GroupNorm (a batch of
    one makes BatchNorm an instance norm anyway). Works at any H, W: decoder levels resize to the exact size
    of the matching encoder level.

    Shape:
        - noise: (1, noise_dim, H, W)
        - output: (1, out_dim, H, W)
    """

    def __init__(
        self, out_dim: int, *, noise_dim: int = 32, width: int = 64, depth: int = 4, skip: int = 4
    ) -> None:
        super().__init__()
        self.down = nn.ModuleList(_Down(noise_dim if i == 0 else width, width) for i in range(depth))
        self.skips = nn.ModuleList(nn.Conv2d(noise_dim if i == 0 else width, skip, 1) for i in range(depth))
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width + skip, width, 3, padding=1, padding_mode="reflect"),
                nn.GroupNorm(1, width),
                nn.LeakyReLU(0.2),
            )
            for _ in range(depth)
        )
        self.head = nn.Conv2d(width, out_dim, 1)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        x, levels = noise, []
        for down, skip in zip(self.down, self.skips):
            levels.append(skip(x))
            x = down(x)
        for up, s in zip(reversed(self.up), reversed(levels)):
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, s], dim=1))
        return self.head(x)


class DIPUpsampler(Upsampler):
    """A fitted Deep Image Prior: the rendered high-res features of one image, resized to the asked size.

    Shape:
        - lr_feats: (1, C, h, w) (checked only); image: optional (1, 3, H, W)
        - output: (1, C, H', W')
    """

    guided = False

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        if features.dim() != 4 or features.shape[0] != 1:
            raise ValueError(f"expected fitted features (1,C,H,W), got shape {tuple(features.shape)}")
        self.register_buffer("features", features.detach())

    def upsample(
        self, lr_feats: torch.Tensor, image: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        if lr_feats.shape[0] != 1 or lr_feats.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"expected lr_feats (1,{self.features.shape[1]},h,w) of the fitted image, "
                f"got {tuple(lr_feats.shape)}"
            )
        return _resize(self.features, size).to(lr_feats.dtype)

    def config(self) -> dict[str, Any]:
        return {"feat_dim": int(self.features.shape[1]), "size": list(self.features.shape[-2:])}


def fit_dip(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    steps: int = 2000,
    *,
    n_jitters: int = 10,
    lr: float = 1e-3,
    pca_dim: int = 128,
    kernel_size: int = 29,
    max_pad: int = 30,
    max_zoom: float = 1.8,
    noise_std: float = 1.0 / 30,
    width: int = 64,
    depth: int = 4,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    device: str | torch.device | None = None,
) -> DIPUpsampler:
    """Fit a Deep Image Prior to one image's features with FeatUp's multi-view loss (eq. 1).

    Exactly the implicit upsampler's objective with the implicit network swapped for :class:`DIPNet`: the
    features are compressed to ``pca_dim`` principal components, each step draws ``n_jitters`` jitters and
    minimises the uncertainty-weighted reconstruction loss between ``PCA(f(t(x)))`` and ``down(t(F_hr))``
    (attention downsampler, NAdam). As in Ulyanov et al. the input code is perturbed with Gaussian noise of
    std ``noise_std`` at each step. No TV prior: DIP's convolutional structure is its prior.

    Args:
        backbone: frozen feature extractor ``(B,3,H,W) -> (B,C,h,w)``, on ``device``.
        image: the image, RGB in [0, 1].
        steps: optimiser steps.
        width, depth: channels and levels of :class:`DIPNet`.
        callback: called as ``callback(step, loss)`` after every step.
        device: where everything is fitted (PCA, network, noise, downsampler, head); default the image's
            device. The image is moved there.

    Returns:
        A :class:`DIPUpsampler` holding the rendered, un-compressed high-res features (eval mode), on
        ``device``.

    Shape:
        - image: (1, 3, H, W)
        - output of the returned upsampler: (1, C, H, W) at the image size
    """
    from featup.core import apply_jitter, create_downsampler, sample_jitter
    from featup.core.losses import UncertaintyHead, reconstruction_loss
    from featup.core.pca import PCA

    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected one image (1,3,H,W), got shape {tuple(image.shape)}")
    if steps < 1:
        raise ValueError(f"expected steps >= 1, got {steps}")
    device = image.device if device is None else torch.device(device)
    image = image.to(device)
    gen = torch.Generator().manual_seed(seed)  # jitter parameters (Python numbers) and the fixed code
    with torch.no_grad():
        lr_feats = backbone(image)
    out_size = tuple(lr_feats.shape[-2:])
    pca = PCA(int(lr_feats.shape[1]), pca_dim).to(device).fit(lr_feats)
    k = int(pca.components.shape[0])
    # every draw (init, dropout of the downsampler, noise) is seeded without touching the caller's RNG;
    # the per-step noise comes from the device's own generator, seeded here (no host round trip per step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = DIPNet(k, width=width, depth=depth).to(device)
        down = create_downsampler("attention", k, kernel_size).to(device)
        head = UncertaintyHead(k).to(device)
        noise = (torch.rand((1, 32, *image.shape[-2:]), generator=gen) * 0.1).to(device)
        params = [p for m in (net, down, head) for p in m.parameters()]
        optim = torch.optim.NAdam(params, lr=lr)
        for m in (net, down, head):
            m.train()
        for step in tqdm(range(steps), disable=not progress, desc="fit_dip"):
            jitters = [sample_jitter(gen, max_pad=max_pad, max_zoom=max_zoom) for _ in range(n_jitters)]
            views = apply_jitter(image.expand(n_jitters, -1, -1, -1), jitters)
            with torch.no_grad():
                targets = pca.transform(backbone(views))
            hr = net(noise + noise_std * torch.randn(noise.shape, device=device))
            pred = down(apply_jitter(hr.expand(n_jitters, -1, -1, -1), jitters), out_size)
            loss = reconstruction_loss(pred, targets, head(targets))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if callback is not None:
                callback(step + 1, float(loss.detach()))
        net.eval()
        with torch.no_grad():
            feats = pca.inverse_transform(net(noise))
    return DIPUpsampler(feats).eval()
