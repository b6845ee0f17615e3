"""``featup serve``: the interactive web demo in the browser, offline, on this machine.

    featup serve                                   # http://127.0.0.1:7860, EfficientNet-Lite0 + shipped JBU
    featup serve --backbone dinov2_vits14 --weights dinov2.safetensors --port 8000
    featup serve --checkpoint jbu.safetensors      # a JBU from `featup train-jbu` for the chosen backbone

Needs the ``app`` extra (``pip install featup-eval[app]``: Gradio). It never opens a public share link unless
``--share`` is given; everything it writes (uploads, downloads) goes into one temporary folder, removed at exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

from featup.eval.errors import UsageError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from featup.eval.app.callbacks import DEFAULT_BACKBONE

    p = subparsers.add_parser(
        "serve",
        help="the interactive web demo (upload a photo, PCA panels, click for similarity heatmaps)",
        description="Serve the FeatUp web demo: upload/webcam/clipboard/example photos, any backbone, layer "
        "and upsampler (bilinear, jbu_classic, the JBU, the implicit upsampler), PCA panels, cosine-similarity "
        "heatmaps of a clicked point, CAM, downloads. Offline; needs `pip install featup-eval[app]`.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        metavar="NAME",
        help=f"default backbone (default {DEFAULT_BACKBONE})",
    )
    p.add_argument("--layer", metavar="LAYER", help="the backbone's layer option (default: its default)")
    p.add_argument("--weights", metavar="PATH", help="local weights for --backbone (.safetensors or .pth)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="JBU checkpoint for --backbone (default: the shipped JBU, if any)",
    )
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (smoke tests)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--share", action="store_true", help="also open a public Gradio share link (off unless given)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"expected --port in 1..65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    workdir = tempfile.mkdtemp(prefix="featup-serve-")
    # Gradio's uploads and cache go into the same temporary folder (read when gradio is imported)
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(workdir, "gradio")
    from featup.eval.app.callbacks import AppError, DemoApp

    try:
        from featup.eval.app.layout import launch
    except ImportError as exc:
        raise UsageError(f"featup serve needs Gradio ({exc}): pip install 'featup-eval[app]'") from None
    try:
        app = DemoApp(
            args.backbone,
            args.layer,
            args.weights,
            args.checkpoint,
            pretrained=not args.no_pretrained,
            device=args.device,
            workdir=workdir,
        )
    except AppError as exc:
        raise UsageError(str(exc)) from None
    # a plain `kill` (SIGTERM) ends the server like Ctrl-C, so the temporary folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"featup serve: http://{args.host}:{args.port} (temporary files in {workdir})", file=sys.stderr)
    try:
        launch(app, args.host, args.port, share=args.share, block=True)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0
