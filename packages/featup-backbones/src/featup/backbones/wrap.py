"""Turn any user network or function into a :class:`featup.backbones.Backbone`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from featup.backbones.base import Backbone, FitMode

__all__ = ["WrappedBackbone", "wrap_backbone"]


def _as_feature_tensor(out: Any, where: str) -> torch.Tensor:
    # torchvision feature extractors return {"out": tensor}; accept that and single-entry mappings
    if isinstance(out, Mapping):
        if "out" in out:
            out = out["out"]
        elif len(out) == 1:
            out = next(iter(out.values()))
        else:
            raise ValueError(f"{where}: got a mapping with keys {list(out)}; expected a tensor or key 'out'")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where}: expected features (B,C,h,w), got {got}")
    return out


class WrappedBackbone(Backbone):
    """A user network ``(B,3,H,W) -> (B,C,h,w)`` under the backbone contract.

    Args:
        fn: ``nn.Module`` (registered as ``self.model``: moves with ``.to()``, frozen with the backbone)
            or any callable.
        feat_dim: output channels.
        stride: input pixels per output cell.
        mean: RGB mean applied before ``fn`` (``None``: ``fn`` receives the [0, 1] image unchanged).
        std: RGB standard deviation applied before ``fn``.
        **kwargs: :class:`featup.backbones.Backbone` options (name, use_norm, fit, frozen, check_range).

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, feat_dim, h, w)
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Any],
        *,
        feat_dim: int,
        stride: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(feat_dim=feat_dim, stride=stride, mean=mean, std=std, **kwargs)
        if isinstance(fn, nn.Module):
            self.model = fn
            self._fn = None
        else:
            self.model = None
            self._fn = fn

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped network's output on a normalized, fitted image.

        Shape:
            - x: (B, 3, H, W)
            - output: (B, feat_dim, h, w)
        """
        fn = self.model if self.model is not None else self._fn
        assert fn is not None
        return _as_feature_tensor(fn(x), self.name)


def wrap_backbone(
    module_or_callable: Callable[[torch.Tensor], Any],
    feat_dim: int | None = None,
    stride: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    name: str = "wrapped",
    fit: FitMode = "none",
    use_norm: bool = False,
    frozen: bool = True,
    check_range: bool = True,
    probe_size: tuple[int, int] = (224, 224),
) -> WrappedBackbone:
    """Wrap a network so it follows the backbone contract; missing metadata comes from one probe pass.

    Args:
        module_or_callable: ``nn.Module`` or callable mapping a (B,3,H,W) image to (B,C,h,w) features (a
            mapping with key ``"out"`` or a single entry, as torchvision feature extractors return, is also
            accepted).
        feat_dim: output channels; inferred when ``None``.
        stride: input pixels per feature cell; inferred as ``round(probe_height / h)`` when ``None`` (the
            probe must give the same ratio for height and width).
        mean: RGB mean the network expects; with ``std``, normalization happens inside the backbone.
            ``None``: the network receives RGB in [0, 1].
        std: RGB standard deviation the network expects.
        name: name shown in ``repr`` and error messages.
        fit: ``"none"`` (default: the image reaches the network unchanged), ``"resize"`` or ``"pad"`` (to a
            multiple of ``stride``; see :class:`featup.backbones.Backbone`).
        use_norm: LayerNorm over channels without affine parameters on the output.
        frozen: freeze a module's parameters and lock it in eval mode (see :class:`Backbone`).
        check_range: reject inputs far outside [0, 1].
        probe_size: (H, W) of the probe image, a mid-gray batch of one, run under ``torch.no_grad``.

    Returns:
        A :class:`WrappedBackbone` in eval mode.

    Shape:
        - image: (B, 3, H, W), RGB in [0, 1]
        - output: (B, C, h, w)
    """
    if not callable(module_or_callable):
        raise TypeError(f"expected an nn.Module or callable, got {type(module_or_callable).__name__}")
    if feat_dim is None or stride is None:
        probe_h, probe_w = probe_size
        bb = WrappedBackbone(
            module_or_callable, feat_dim=1, stride=1, mean=mean, std=std, name=name, frozen=frozen
        )
        if frozen:
            bb.freeze_()
        bb.eval()
        ref = bb._reference_tensor()
        probe = torch.full(
            (1, 3, probe_h, probe_w),
            0.5,
            dtype=ref.dtype if ref is not None else torch.float32,
            device=ref.device if ref is not None else None,
        )
        with torch.no_grad():
            out = bb.forward_features(bb.normalize(probe))
        _, c, h, w = out.shape
        if feat_dim is None:
            feat_dim = int(c)
        elif feat_dim != c:
            raise ValueError(f"{name}: feat_dim={feat_dim} given, but the network returned {c} channels")
        if stride is None:
            sh, sw = probe_h / h, probe_w / w
            stride = max(1, round(sh))
            if abs(sh - sw) > 0.5 or abs(sh - stride) > 0.5:
                raise ValueError(
                    f"{name}: cannot infer one integer stride from a {probe_h}x{probe_w} probe giving a "
                    f"{h}x{w} grid; pass stride="
                )
    bb = WrappedBackbone(
        module_or_callable,
        feat_dim=feat_dim,
        stride=stride,
        mean=mean,
        std=std,
        name=name,
        fit=fit,
        use_norm=use_norm,
        frozen=frozen,
        check_range=check_range,
    )
    if frozen:
        bb.freeze_()
    return bb.eval()
