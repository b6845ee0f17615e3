"""The web demo's page: Gradio components wired to :class:`~featup.eval.app.callbacks.DemoApp`.

Every event handler here only converts between Gradio values and the callbacks' plain values, and turns an
:class:`~featup.eval.app.callbacks.AppError` into a message in the page (``gr.Error``), so a bad upload never
stops the server. Needs the ``app`` extra (``pip install featup-eval[app]``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from featup.eval.app.callbacks import UPSAMPLERS, AppError, DemoApp, _uint8, imagenet_classes

__all__ = ["MAX_UPLOAD", "build_blocks", "example_photos", "launch"]

#: Gradio injects a progress tracker into a parameter whose default is a gr.Progress
_PROGRESS = gr.Progress()
#: largest accepted upload (Gradio refuses larger files before they reach a callback)
MAX_UPLOAD = "25mb"

_INTRO = """# FeatUp: high-resolution features from any backbone
Upload a photo (or use the webcam, paste from the clipboard, or pick an example), choose a backbone, a layer
and an upsampler, and press **Run**. The rows show principal components 1-3, 4-6 and 7-9 of the low-res
features and of the upsampled ones (one PCA, fitted on the low-res features). **Click the image** on the right
to see where the clicked point's feature appears again (cosine similarity), at low and at high resolution.
Everything runs on this machine, offline."""


def example_photos() -> list[str]:
    """Paths of real photos bundled with installed packages (scikit-image, matplotlib), never fetched."""
    try:
        from featup.eval.photos import photo_names, photo_path

        names = [*photo_names("eval"), "rocket", "motorcycle_left"]
        return [str(photo_path(n)) for n in names]
    except (ImportError, OSError, RuntimeError, ValueError):
        pass
    found: list[str] = []
    try:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        found += [str(root / n) for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    except ImportError:
        pass
    try:
        import matplotlib

        found.append(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    return [p for p in found if Path(p).is_file()]


def _payload_path(value: Any) -> Any:
    """A Gradio file payload (dict or FileData), a path, or None -> something ``load_image`` takes."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path") or value.get("url")
    return getattr(value, "path", value)


def build_blocks(app: DemoApp, *, title: str = "FeatUp") -> Any:
    """The page: inputs and choices on the left, panels, heatmaps, CAM and downloads on the right."""

    def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request/SelectData/Progress by it
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except AppError as exc:
                raise gr.Error(str(exc), duration=None) from None
            except Exception as exc:  # a bug must show in the page, and the server keeps serving
                raise gr.Error(f"internal error: {type(exc).__name__}: {exc}", duration=None) from None

        return wrapper

    backbones = app.backbone_choices()
    classes = ["top-1", *(f"{i}: {n}" for i, n in enumerate(imagenet_classes()))]
    photos = example_photos()

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="photo",
                    sources=["upload", "webcam", "clipboard"],
                    type="filepath",
                    image_mode=None,
                    format="png",
                    elem_id="input-image",
                    height=260,
                )
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                if photos:
                    gr.Examples(examples=[[p] for p in photos], inputs=[image], label="example photos")
                backbone = gr.Dropdown(
                    backbones, value=app.default_backbone, label="backbone", elem_id="backbone"
                )
                layer = gr.Textbox(
                    value=app.default_layer,
                    label="layer (empty: the default; efficientnet_lite0: 8, 16, 32 or head; ViTs: a block index)",
                    elem_id="layer",
                )
                upsampler = gr.Radio(list(UPSAMPLERS), value="jbu", label="upsampler", elem_id="upsampler")
                steps = gr.Slider(
                    1,
                    2000,
                    value=20,
                    step=1,
                    label="implicit: fitting steps (seconds each on a CPU at 224 px; Cancel stops the fit)",
                    elem_id="steps",
                )
                input_size = gr.Slider(32, 1024, value=224, step=8, label="input size (longer side, px)")
                with gr.Row():
                    out_h = gr.Number(value=0, precision=0, label="output height (0: auto)", elem_id="out-h")
                    out_w = gr.Number(value=0, precision=0, label="output width (0: auto)", elem_id="out-w")
                checkpoint = gr.File(
                    label="JBU checkpoint (optional, .safetensors from featup train-jbu)",
                    file_types=[".safetensors", ".ckpt"],
                    elem_id="checkpoint",
                )
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    clickable = gr.Image(
                        label="click a point",
                        interactive=False,
                        elem_id="click-image",
                        format="png",
                        height=240,
                    )
                    heat_lr = gr.Image(
                        label="cosine, low-res",
                        interactive=False,
                        elem_id="heat-lr",
                        format="png",
                        height=240,
                    )
                    heat_hr = gr.Image(
                        label="cosine, upsampled",
                        interactive=False,
                        elem_id="heat-hr",
                        format="png",
                        height=240,
                    )
                heat_info = gr.Markdown("", elem_id="heat-info")
                panel1 = gr.Image(label="components 1-3", interactive=False, elem_id="panel-1", format="png")
                panel2 = gr.Image(label="components 4-6", interactive=False, elem_id="panel-2", format="png")
                panel3 = gr.Image(label="components 7-9", interactive=False, elem_id="panel-3", format="png")
                px = gr.Number(visible=False, label="x")
                py = gr.Number(visible=False, label="y")
                heat_button = gr.Button("heatmaps at (x, y)", visible=False)
                with gr.Row():
                    cam_class = gr.Dropdown(
                        classes, value="top-1", label="CAM: ImageNet class", elem_id="cam-class"
                    )
                    cam_button = gr.Button("CAM", elem_id="cam")
                with gr.Row():
                    cam_lr = gr.Image(label="CAM, low-res", interactive=False, elem_id="cam-lr", format="png")
                    cam_hr = gr.Image(
                        label="CAM, upsampled", interactive=False, elem_id="cam-hr", format="png"
                    )
                cam_info = gr.Markdown("", elem_id="cam-info")
                with gr.Row():
                    dl_features = gr.File(
                        label="features (.safetensors)", interactive=False, elem_id="dl-features"
                    )
                    dl_panel = gr.File(label="panel (.png)", interactive=False, elem_id="dl-panel")

        model_inputs = [image, backbone, layer, upsampler, steps, input_size, out_h, out_w, checkpoint]

        def _result(img, bb, lay, up, st, size, oh, ow, ckpt, request, progress):
            session = getattr(request, "session_hash", None) or "default"

            def report(fraction: float, desc: str) -> None:
                progress(fraction, desc=desc)

            return app.compute(
                _payload_path(img),
                bb,
                lay,
                up,
                st,
                size,
                oh,
                ow,
                _payload_path(ckpt),
                session=session,
                progress=report,
            )

        @guard
        def on_run(img, bb, lay, up, st, size, oh, ow, ckpt, request: gr.Request, progress=_PROGRESS):
            r = _result(img, bb, lay, up, st, size, oh, ow, ckpt, request, progress)
            return (
                r.summary(),
                *r.panels,
                _uint8(r.image),
                str(app.download_features(r)),
                str(app.download_panel(r)),
            )

        @guard
        def on_click(
            img,
            bb,
            lay,
            up,
            st,
            size,
            oh,
            ow,
            ckpt,
            evt: gr.SelectData,
            request: gr.Request,
            progress=_PROGRESS,
        ):
            if evt is None or evt.index is None:
                raise AppError("no click position came with the event")
            return _heat(
                img, bb, lay, up, st, size, oh, ow, ckpt, evt.index[0], evt.index[1], request, progress
            )

        def _heat(img, bb, lay, up, st, size, oh, ow, ckpt, x, y, request, progress):
            r = _result(img, bb, lay, up, st, size, oh, ow, ckpt, request, progress)
            h = app.heatmaps(r, x, y)
            info = (
                f"query point x={h.point[0]:.0f}, y={h.point[1]:.0f}: low-res map {h.lowres.shape[1]}x"
                f"{h.lowres.shape[0]}, upsampled map {h.highres.shape[1]}x{h.highres.shape[0]} (W x H); "
                f"heatmaps {h.timing * 1000:.0f} ms, features {'cached' if r.cache_hits else 'computed'}"
            )
            return h.lowres_rgb, h.highres_rgb, info

        @guard
        def on_point(img, bb, lay, up, st, size, oh, ow, ckpt, x, y, request: gr.Request, progress=_PROGRESS):
            return _heat(img, bb, lay, up, st, size, oh, ow, ckpt, x, y, request, progress)

        @guard
        def on_cam(img, bb, lay, up, st, size, oh, ow, ckpt, cls, request: gr.Request, progress=_PROGRESS):
            r = _result(img, bb, lay, up, st, size, oh, ow, ckpt, request, progress)
            return app.cam(
                r,
                cls,
                session=getattr(request, "session_hash", None) or "default",
                progress=lambda f, d: progress(f, desc=d),
            )

        def on_cancel(request: gr.Request):
            return app.cancel(getattr(request, "session_hash", None) or "default")

        run.click(
            on_run,
            inputs=model_inputs,
            outputs=[status, panel1, panel2, panel3, clickable, dl_features, dl_panel],
            preprocess=False,
            api_name="panels",
        )
        clickable.select(
            on_click,
            inputs=model_inputs,
            outputs=[heat_lr, heat_hr, heat_info],
            preprocess=False,
            api_visibility="private",
        )
        # the same computation by pixel coordinates, for API clients (in the page a click carries them)
        heat_button.click(
            on_point,
            inputs=[*model_inputs, px, py],
            outputs=[heat_lr, heat_hr, heat_info],
            preprocess=False,
            api_name="heatmaps",
        )
        cam_button.click(
            on_cam,
            inputs=[*model_inputs, cam_class],
            outputs=[cam_lr, cam_hr, cam_info],
            preprocess=False,
            api_name="cam",
        )
        # the running fit stops at its next step and its event ends with a "cancelled" message in the page
        cancel.click(on_cancel, None, status, api_name="cancel", queue=False)
    return demo


def launch(
    app: DemoApp,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    share: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve the page; returns the Blocks (already running when ``block`` is False).

    Never opens a public share link unless ``share`` is True.
    """
    demo = build_blocks(app)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=bool(share),
        max_file_size=MAX_UPLOAD,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=quiet,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        inbrowser=False,
        allowed_paths=[str(app.workdir)],
    )
    return demo
