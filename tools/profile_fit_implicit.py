"""Where a fit_implicit step goes at Table 7's settings, and what makes the default preset faster.

    python tools/profile_fit_implicit.py groups [--root TREE] [--steps 2]
    python tools/profile_fit_implicit.py decompose [--repeats 3]

``groups``: one fast-path step (224 px, 384-channel stride-16 patch backbone, 10 jitters, attention
downsampler, kernel 29, PCA 128, view bank, fused pooling, channel dropout) with every aten op timed by a
``TorchDispatchMode`` and grouped by what it computes: the autograd node in backward, the source line in
forward (qualified names of the innermost featup functions). ``--root`` profiles another tree (e.g. a ``git archive`` of the base commit) with its own code. The
timer adds Python overhead to every op (the step takes longer than unprofiled); compare shares.

``decompose``: CPU time per step of the fast path while switching Table 7's settings one at a time towards
the default preset's (downsampler, kernel, jitters), in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (group, substrings of the autograd node's name or of the forward's source location)
GROUPS = [
    (
        "MLP: first layer (grid field) and hidden layers",
        [
            "ImplicitUpsampler",
            "Addmm",
            "LayerNorm",
            "Relu",
            "Addcmul",
            "ScaleRows",
            "Baddbmm",
            "Expand",
            "CopySlices",
        ]
        + ["AsStrided", "MvBackward", "Rsqrt", "SubBackward", "DivBackward", "PowBackward", "CatBackward"]
        + ["SinBackward", "CosBackward", "SliceBackward", "TBackward", "UnsqueezeBackward", "ViewBackward"],
    ),
    (
        "pooling products (_SparsePool CSR products; tile path: _TilePool GEMMs, tile copies)",
        ["SparsePool", "TilePool"],
    ),
    (
        "pooling matrices Ay^T a Ax (and the CSR structure)",
        [
            "fused_view_pool",
            "_sparse_view_pool",
            "_tile_view_pool",
            "BmmBackward",
            "IndexBackward",
            "UnbindBackward",
        ],
    ),
    ("salience with dropout", ["_salience", "MulBackward", "MmBackward"]),
    (
        "attention weights: jittered salience, windows, softmax",
        ["_attention_weights", "_jitter_map", "_masked_softmax", "IndexSelect", "MaskedFill", "Softmax"]
        + ["GatherBackward", "SumBackward", "_axis_taps", "_jitter_taps"],
    ),
    ("TV and magnitude", ["ChannelNorm", "VectorNorm", "tv_loss", "_tv", "_magnitude"]),
    ("summing the field's gradients", ["PermuteBackward", "AddBackward"]),
]

FAST = {"preset": "paper", "bank_size": 64, "fused": True, "dropout_mode": "channel", "n_jitters": 10}
TABLE7 = {**FAST, "kernel_size": 29, "pca_dim": 128}


def _setup(root: Path | None):
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str((root or ROOT) / "packages" / "featup-core" / "src"))
    import importlib

    import torch

    core = importlib.import_module("featup.core")  # before bench_perf_implicit, which puts ROOT's first
    bench = importlib.import_module("bench_perf_implicit")

    if root is not None and not core.__file__.startswith(str(root)):
        raise SystemExit(f"featup.core came from {core.__file__}, not {root}")
    torch.set_num_threads(1)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return torch, core.fit_implicit, bench.PatchBackbone(384).eval(), image


def groups(args: argparse.Namespace) -> None:
    torch, fit, backbone, image = _setup(args.root)
    from torch.utils._python_dispatch import TorchDispatchMode

    spent: dict[str, float] = defaultdict(float)

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args_, **(kwargs or {}))
            took = time.perf_counter() - start
            node = torch._C._current_autograd_node()
            if node is not None:
                where = type(node).__name__
            else:
                names, frame = [], sys._getframe(1)
                while frame is not None and len(names) < 3:
                    if "featup" in frame.f_code.co_filename:
                        names.append(frame.f_code.co_qualname)
                    frame = frame.f_back
                where = " < ".join(names)
            spent[where] += took
            return out

    timer, calls, started = Timer(), [0], []

    def callback(step, logs):
        calls[0] += 1
        if calls[0] == 2:  # after the set-up step and one warm-up step
            timer.__enter__()
            started.append(time.perf_counter())

    fit(backbone, image, 2 + args.steps, progress=False, callback=callback, **TABLE7)
    timer.__exit__(None, None, None)
    per_step = (time.perf_counter() - started[0]) / args.steps
    grouped: dict[str, float] = defaultdict(float)
    rest: dict[str, float] = {}
    for where, took in spent.items():
        name = next((g for g, keys in GROUPS if any(k in where for k in keys)), "the rest")
        grouped[name] += took / args.steps
        if name == "the rest":
            rest[where] = took / args.steps
    total = sum(grouped.values())
    print(f"{args.root or ROOT}: {1e3 * per_step:.0f} ms per step under the op timer ({args.steps} steps)")
    print("| what | ms per step | share |\n|---|---:|---:|")
    for name, took in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1e3 * took:.0f} | {100 * took / total:.0f}% |")
    if args.verbose:
        for where, took in sorted(rest.items(), key=lambda kv: -kv[1])[:12]:
            print(f"    the rest: {1e3 * took:6.1f} ms  {where}")


def decompose(args: argparse.Namespace) -> None:
    torch, fit, backbone, image = _setup(None)
    paths = {
        "fast path, attention k29 (Table 7)": TABLE7,
        "attention k16": {**TABLE7, "kernel_size": 16},
        "simple k29": {**TABLE7, "downsampler": "simple"},
        "simple k16": {**TABLE7, "downsampler": "simple", "kernel_size": 16},
        "simple k16, zoom <= 1.2, no flips": {
            **TABLE7,
            "downsampler": "simple",
            "kernel_size": 16,
            "max_zoom": 1.2,
            "p_flip": 0.0,
        },
        "default preset (simple k16, residual, consistency, cosine schedule)": {
            "n_jitters": 10,
            "pca_dim": 128,
        },
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, settings in paths.items():
            marks: list[float] = []
            fit(
                backbone,
                image,
                5,
                progress=False,
                callback=lambda s, l, out=marks: out.append(time.process_time()),
                **settings,
            )
            times[name] += [b - a for a, b in zip(marks, marks[1:])]
    base = statistics.median(times["fast path, attention k29 (Table 7)"])
    print("| settings (fast path, 224 px, 384 ch, 10 jitters, PCA 128) | CPU ms per step | vs Table 7 |")
    print("|---|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1e3 * med:.0f} | {base / med:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("groups")
    g.add_argument("--root", type=Path, default=None, help="tree whose featup-core to profile")
    g.add_argument("--steps", type=int, default=2)
    g.add_argument("--verbose", action="store_true", help="list the largest ungrouped items")
    d = sub.add_parser("decompose")
    d.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    (groups if args.mode == "groups" else decompose)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
