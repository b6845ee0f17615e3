"""The ``featup`` command: one sub-command per module in ``featup.eval.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
``run(args) -> int`` callable. Bad input raises ``UsageError`` (or a ValueError/OSError from the library)
and becomes one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from featup.eval.errors import UsageError

__all__ = ["COMMANDS", "build_parser", "main"]

#: command modules, in the order ``featup --help`` lists them
COMMANDS: tuple[str, ...] = (
    "upsample",
    "similarity",
    "train_jbu",
    "fit_implicit",
    "bench",
    "demo",
    "probe",
    "cam",
    "segment",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featup", description="FeatUp: high-resolution features from any vision backbone."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"featup.eval.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("featup: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, TypeError, RuntimeError) as exc:
        from featup.core import CheckpointError  # noqa: F401  (a ValueError: handled above)

        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"featup {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
