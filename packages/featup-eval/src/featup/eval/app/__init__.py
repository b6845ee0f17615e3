"""``featup serve``: the interactive web demo (needs the ``app`` extra: ``pip install featup-eval[app]``).

:mod:`featup.eval.app.callbacks` holds the work as plain functions (tested without a server);
:mod:`featup.eval.app.layout` is the Gradio page that calls them.
"""

from __future__ import annotations

from featup.eval.app.callbacks import DEFAULT_BACKBONE, UPSAMPLERS, AppError, Cancelled, DemoApp

__all__ = ["DEFAULT_BACKBONE", "UPSAMPLERS", "AppError", "Cancelled", "DemoApp"]
