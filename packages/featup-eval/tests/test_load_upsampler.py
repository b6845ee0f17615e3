"""The CLI's checkpoint loader (``featup upsample --checkpoint``, the web demo): JBU configs of every age."""

from __future__ import annotations

import warnings

import torch

from featup.core import JBUStack, save_checkpoint
from featup.eval.commands._common import _load_upsampler


def test_a_jbu_checkpoint_saved_before_the_layout_options_loads_by_name(tmp_path):
    """A config written before ``range_kernel`` / ``guidance_encoder`` / ``constrained_fixup`` /
    ``safe_start`` existed is the layout it was trained with (``JBUStack.LEGACY_KWARGS``), not today's
    default; it loads without a warning, to the saved stack's outputs."""
    layout = {"range_kernel": "dot", "guidance_encoder": False, "constrained_fixup": False}
    up = JBUStack(key_dim=8, radius=2, n_stages=2, variant=layout, safe_start=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    old = {k: v for k, v in up.config().items() if k not in (*layout, "safe_start")}
    path = save_checkpoint(
        tmp_path / "old", up.state_dict(), {"class": "JBUStack", "kwargs": old, "extra": {}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = _load_upsampler("jbu", str(path), feat_dim=5)
    assert loaded.config() == up.config()
    x, image = torch.randn(1, 5, 4, 6, generator=g), torch.rand(1, 3, 29, 43, generator=g)
    torch.testing.assert_close(loaded(x, image), up(x, image), atol=0, rtol=0)
