"""featup.eval: FeatUp's evaluations, the synthetic benchmark and the ``featup`` command."""

from __future__ import annotations

__all__: list[str] = []
