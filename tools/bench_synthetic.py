#!/usr/bin/env python
"""Synthetic benchmark: every upsampler against known ideal features; prints markdown, writes JSON.

    python tools/bench_synthetic.py [--quick] [--json PATH] [featup bench options]

Same as ``featup bench`` (see ``featup bench --help``); ``nox -s bench`` runs it with ``--json``.
"""

from __future__ import annotations

import sys

from featup.eval.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
