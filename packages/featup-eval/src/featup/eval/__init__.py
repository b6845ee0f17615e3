"""featup.eval: FeatUp's evaluations, the synthetic benchmark and the ``featup`` command."""

from __future__ import annotations

from featup.eval.pretrained import load_pretrained  # the original project's models (hubconf.py uses it)

__all__: list[str] = ["load_pretrained"]
