"""Small helpers shared by the evaluations: atomic JSON files, resumable result stores, markdown tables."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featup.core.checkpoint import atomic_write_bytes

__all__ = ["ResultStore", "format_number", "markdown_table", "read_json", "settings_tag", "write_json"]


def settings_tag(settings: dict[str, Any]) -> str:
    """A short stable hash of ``settings``, to name partial-state files of one exact configuration."""
    import hashlib

    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json`; a corrupted file raises ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupted results file {path}: {exc}") from None


class ResultStore:
    """A JSON file of per-method results keyed by a run configuration, so finished methods are skipped.

    The file holds ``{"config": {...}, "results": {method: {**metrics, "settings": {...}}}}``. Opening a store
    whose file was written with a different shared config raises ValueError rather than mixing numbers from
    two setups; a method whose own settings changed (say, more training steps) is simply run again.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], *, resume: bool = True) -> None:
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))
        self.results: dict[str, dict[str, Any]] = {}
        if resume and self.path.is_file():
            data = read_json(self.path)
            stored = data.get("config") or {}
            if stored != self.config:
                keys = sorted(
                    k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k)
                )
                raise ValueError(
                    f"{self.path} holds results of a different run ({', '.join(keys)} differ); "
                    f"use another --out folder or --no-resume"
                )
            self.results = dict(data.get("results", {}))

    def get(self, method: str, settings: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The stored metrics of ``method`` if it was run with these ``settings``, else None."""
        entry = self.results.get(method)
        if entry is None or entry.get("settings", {}) != json.loads(json.dumps(settings or {})):
            return None
        return {k: v for k, v in entry.items() if k != "settings"}

    def put(self, method: str, metrics: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        """Record one method's metrics (and the settings it ran with) and rewrite the file atomically."""
        self.results[method] = {**metrics, "settings": settings or {}}
        write_json(self.path, {"config": self.config, "results": self.results})


def format_number(value: Any, digits: int = 2) -> str:
    """A table cell: fixed digits for numbers, '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table with the first column left-aligned and the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
