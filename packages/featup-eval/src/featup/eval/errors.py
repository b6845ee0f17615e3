"""The one error type the ``featup`` command turns into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Bad input from the user: a missing file, an unknown name, an unwritable folder, a wrong checkpoint."""
