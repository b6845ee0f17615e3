"""The per-method loop that ``run_probes`` and ``run_cam`` share: build each Table 1 method, score it, store it.

A method whose result is already stored with the same settings (``method_settings``) is skipped, so an
interrupted evaluation rerun with the same command continues where it stopped. Only the scoring differs
between the evaluations; it is passed in as ``evaluate(name, method, tag)``, where ``tag`` names the
settings for the evaluation's own resumable partial state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from featup.eval._io import ResultStore, settings_tag
from featup.eval.methods import METHODS, FeatureMethod, MethodConfig, build_method, method_settings

__all__ = ["evaluate_methods"]

#: ``evaluate(name, method, tag) -> result``: scores one built method; ``tag`` is ``settings_tag`` of its settings
Evaluate = Callable[[str, FeatureMethod, str], dict[str, Any]]


def evaluate_methods(
    names: Sequence[str],
    backbone: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Evaluate,
    *,
    store: ResultStore,
    cfg: MethodConfig,
    feat_dim: int,
    train_data: Dataset,
    backbone_factory: Callable[..., Callable[[torch.Tensor], torch.Tensor]],
    work_dir: str | os.PathLike,
    progress: bool,
    log: Callable[[str], None],
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """Build (training if needed) and score every method in ``names`` not already in ``store``.

    Args:
        names: method keys of :data:`~featup.eval.methods.METHODS`, in the order of the returned dict.
        backbone: the frozen feature extractor the methods upsample.
        evaluate: scores one method; its result is stored under the method's settings.
        store: results per method, persisted as JSON.
        cfg: method settings.
        feat_dim: channels of the backbone's features.
        train_data: images that train the learned upsamplers.
        backbone_factory: ``factory(stride=s)`` rebuilding the backbone (the strided baseline).
        work_dir: where trained upsamplers are stored and resumed.
        progress: show progress bars.
        log: receives one line per method skipped as done.
        device: where the methods are built, trained and run (default: the backbone's device).

    Returns:
        ``{name: result}`` for every name, stored or new.
    """
    for name in names:
        settings = method_settings(name, cfg)
        if store.get(name, settings) is not None:
            log(f"{METHODS.get(name, name)}: done in an earlier run, skipped")
            continue
        method = build_method(
            name,
            backbone,
            feat_dim=feat_dim,
            cfg=cfg,
            train_data=train_data,
            backbone_factory=backbone_factory,
            backbone_stride=getattr(backbone, "stride", None),
            work_dir=work_dir,
            progress=progress,
            device=device,
        )
        store.put(name, evaluate(name, method, settings_tag(settings)), settings)
    return {n: store.get(n, method_settings(n, cfg)) for n in names}  # type: ignore[misc]
