"""`featup serve` as a real server: started by the command line on a free port, driven over HTTP by
gradio_client (upload a bundled photo, panels, heatmaps, bad input, the upload size limit).

Locally the test skips (saying what is missing) without Gradio; in CI (CI=true) it fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featup.eval.photos import photo_path

BACKBONE = "efficientnet_lite0"


def require(*modules: str, what: str = "") -> None:
    """Skip (locally) or fail (CI=true) when a module the test needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"missing {', '.join(missing)}{what} (pip install 'featup-eval[app,app-test]')"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI must run this test, but: {message}")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    workdir: Path
    proc: subprocess.Popen
    log: Path


def start_server(log: Path, *extra: str, timeout: float = 240.0) -> Served:
    """Run ``featup serve`` in a subprocess and wait until it answers."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("GRADIO_TEMP_DIR", None)
    cmd = [sys.executable, "-m", "featup.eval.cli", "serve", "--port", str(port), *extra]
    fh = log.open("w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"featup serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError(f"featup serve did not answer within {timeout:.0f}s:\n{log.read_text()}")
    match = re.search(r"temporary files in (\S+)\)", log.read_text())
    assert match, log.read_text()
    return Served(url, Path(match.group(1)), proc, log)


def stop_server(served: Served) -> None:
    served.proc.terminate()
    try:
        served.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        served.proc.kill()
        served.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Served]:
    require("gradio", "gradio_client", "httpx")
    served = start_server(tmp_path_factory.mktemp("serve") / "server.log")
    yield served
    stop_server(served)
    # the server removes its temporary folder when it stops
    assert not served.workdir.exists(), served.log.read_text()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("client")))


def panels(client, image, upsampler="jbu", size=160, out_h=0, out_w=0):
    from gradio_client import handle_file

    return client.predict(
        handle_file(str(image)), BACKBONE, "", upsampler, 5, size, out_h, out_w, None, api_name="/panels"
    )


def heatmaps(client, image, x, y, upsampler="jbu", size=160, out_h=0, out_w=0):
    from gradio_client import handle_file

    return client.predict(
        handle_file(str(image)),
        BACKBONE,
        "",
        upsampler,
        5,
        size,
        out_h,
        out_w,
        None,
        x,
        y,
        api_name="/heatmaps",
    )


def _array(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_api_lists_the_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/panels", "/heatmaps", "/cam", "/cancel"} <= names


def test_panels_heatmaps_and_downloads(client, server):
    from safetensors.torch import load_file

    cat = photo_path("chelsea")  # 451x300 -> 160x106 at input size 160
    status, p1, p2, p3, shown, feats, panel = panels(client, cat, out_h=212)
    assert "efficientnet_lite0" in status and "ms" in status
    assert _array(shown).shape == (106, 160, 3)
    shapes = {_array(p).shape for p in (p1, p2, p3)}
    assert len(shapes) == 1 and next(iter(shapes))[2] == 3
    assert not np.array_equal(_array(p1), _array(p2))
    tensors = load_file(feats)
    assert tuple(tensors["lowres"].shape) == (1, 112, 7, 10)
    assert tuple(tensors["highres"].shape) == (1, 112, 212, 320)
    assert _array(panel).shape[0] == 3 * _array(p1).shape[0]
    # the server wrote its files into its temporary folder only
    assert any((server.workdir / "downloads").glob("*-features.safetensors"))
    assert any((server.workdir / "gradio").rglob("*"))

    a_lr, a_hr, a_info = heatmaps(client, cat, 40, 30, out_h=212)
    b_lr, b_hr, b_info = heatmaps(client, cat, 130, 90, out_h=212)
    assert _array(a_lr).shape == (106, 160, 3) and _array(a_hr).shape == (212, 320, 3)
    assert not np.array_equal(_array(a_hr), _array(b_hr))
    assert not np.array_equal(_array(a_lr), _array(b_lr))
    assert "x=40, y=30" in a_info and "cached" in b_info  # the second click reused the features


def test_cam_of_the_real_network(client):
    from gradio_client import handle_file

    cat = photo_path("chelsea")
    lo, hi, text = client.predict(
        handle_file(str(cat)), BACKBONE, "", "bilinear", 5, 224, 0, 0, None, "top-1", api_name="/cam"
    )
    assert "'Egyptian cat'" in text
    assert _array(lo).shape == _array(hi).shape == (149, 224, 3)


def test_bad_input_is_a_message_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(AppError, match="not an image"):
        panels(client, text)
    big = tmp_path / "huge.png"
    Image.new("L", (10000, 5000)).save(big)  # 50 MP, a small file
    with pytest.raises(AppError, match="50.0 megapixels"):
        panels(client, big)
    with pytest.raises(AppError, match="outside"):
        heatmaps(client, photo_path("coffee"), 5000, 5, upsampler="bilinear")
    with pytest.raises(AppError, match="unknown upsampler"):
        panels(client, photo_path("coffee"), upsampler="magic")
    # still serving
    status = panels(client, photo_path("coffee"), upsampler="bilinear", size=96)[0]
    assert "bilinear" in status


def test_uploads_are_size_limited(client, server, tmp_path):
    import httpx

    blob = tmp_path / "blob.png"
    blob.write_bytes(os.urandom(26 * 1024 * 1024))  # above the 25 MB limit
    with blob.open("rb") as fh:
        r = httpx.post(f"{server.url}gradio_api/upload", files={"files": ("blob.png", fh)}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert "maximum allowed size" in r.text
    assert "bilinear" in panels(client, photo_path("coffee"), upsampler="bilinear", size=96)[0]


def test_server_refuses_a_checkpoint_for_another_backbone(tmp_path):
    require("gradio")
    from featup.core import JBUStack

    ckpt = JBUStack(384).save(tmp_path / "vit.safetensors", extra={"backbone": "vit_small_patch16_224"})
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "featup.eval.cli",
            "serve",
            "--checkpoint",
            str(ckpt),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 2
    assert "trained for backbone 'vit_small_patch16_224'" in r.stderr


def test_implicit_fit_reports_progress_and_cancels(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    job = client.submit(
        handle_file(str(photo_path("coffee"))),
        BACKBONE,
        "",
        "implicit",
        2000,
        64,
        0,
        0,
        None,
        api_name="/panels",
    )
    deadline = time.monotonic() + 180
    progress = None
    while time.monotonic() < deadline and progress is None:
        for update in job.status().progress_data or []:
            if update.desc and "implicit fit: step" in update.desc:
                progress = update.desc
        time.sleep(0.3)
    assert progress is not None, "no progress of the implicit fit was reported"
    assert "cancelling" in client.predict(api_name="/cancel")
    with pytest.raises(AppError, match=r"cancelled after \d+ of 2000 steps"):
        job.result(timeout=120)
    # the server is free again
    assert "bilinear" in panels(client, photo_path("coffee"), upsampler="bilinear", size=96)[0]


@pytest.mark.parametrize("extra, share", [([], False), (["--share"], True)])
def test_serve_never_shares_unless_asked(monkeypatch, extra, share):
    require("gradio")
    import gradio as gr

    from featup.eval.cli import main

    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs)
        return None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setenv("GRADIO_TEMP_DIR", os.environ.get("GRADIO_TEMP_DIR", ""))  # restored after the test
    assert main(["serve", "--no-pretrained", "--port", "7999", *extra]) == 0
    assert seen["share"] is share
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7999
    assert seen["max_file_size"] == "25mb"
