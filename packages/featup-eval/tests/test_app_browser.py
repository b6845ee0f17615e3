"""`featup serve` in a real browser: headless Chromium (Debian's package, driven by Playwright) loads the page,
uploads a photo, runs, clicks the image twice and sees two different heatmaps; nothing is fetched from outside.

Locally the test skips (saying what is missing) without Playwright or /usr/bin/chromium; in CI (CI=true) it
fails instead. ``FEATUP_SERVE_SCREENSHOT=path.png`` also saves the screenshot there (the README's picture).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from featup.eval.photos import photo_path


def _client_helpers():
    """The server helpers of test_app_client.py (tests run with --import-mode=importlib: no plain import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_featup_app_client", Path(__file__).with_name("test_app_client.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_helpers = _client_helpers()
require, start_server, stop_server = _helpers.require, _helpers.start_server, _helpers.stop_server

CHROMIUM = os.environ.get("FEATUP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 180_000


def _require_chromium() -> None:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"missing Chromium at {CHROMIUM} (apt-get install chromium; or set FEATUP_CHROMIUM)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI must run this test, but: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    require("gradio", "playwright", "httpx")
    _require_chromium()
    served = start_server(tmp_path_factory.mktemp("serve-browser") / "server.log")
    yield served
    stop_server(served)


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1500})
            pg.set_default_timeout(TIMEOUT_MS)

            def route(r):  # the page must work offline: anything not from the server is refused
                url = r.request.url
                if url.startswith(("http://127.0.0.1", "data:", "blob:")):
                    r.continue_()
                else:
                    outside.append(url)
                    r.abort()

            pg.route("**/*", route)
            pg.outside = outside  # type: ignore[attr-defined]
            pg.goto(server.url, wait_until="networkidle")
            yield pg
        finally:
            browser.close()


def _src_change(page, selector: str, old: str | None) -> str:
    """Wait until the <img> in ``selector`` shows a picture other than ``old``; return its src."""
    img = page.locator(f"{selector} img")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        if img.count() and (src := img.first.get_attribute("src")) and src != old:
            return src
        time.sleep(0.2)
    raise AssertionError(f"{selector} did not show a new image within {TIMEOUT_MS / 1000:.0f}s")


def _upload_and_run(page, image: Path) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    page.locator("#input-image img").first.wait_for()
    page.locator("#run").click()


def test_upload_click_heatmaps_in_chromium(page, tmp_path):
    _upload_and_run(page, photo_path("chelsea"))
    panel = _src_change(page, "#panel-1", None)
    assert "/gradio_api/file=" in panel
    assert "efficientnet_lite0" in page.locator("#status").inner_text()

    target = page.locator("#click-image img").first
    target.wait_for()

    def click_pixel(x: int, y: int) -> None:
        """Click natural pixel (x, y) of the shown image (Gradio letterboxes it inside the <img> box)."""
        box = target.bounding_box()
        nw, nh = target.evaluate("e => [e.naturalWidth, e.naturalHeight]")
        scale = min(box["width"] / nw, box["height"] / nh, 1.0)
        left, top = (box["width"] - nw * scale) / 2, (box["height"] - nh * scale) / 2
        target.click(position={"x": left + (x + 0.5) * scale, "y": top + (y + 0.5) * scale})

    assert target.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [224, 149]  # chelsea at 224 px
    click_pixel(170, 120)
    first = _src_change(page, "#heat-hr", None)
    first_lr = page.locator("#heat-lr img").first.get_attribute("src")
    info = page.locator("#heat-info").inner_text()
    assert "x=170, y=120" in info  # the server got the clicked pixel
    assert "cached" in info  # and reused the Run's features

    click_pixel(74, 60)  # the cat's left eye
    second = _src_change(page, "#heat-hr", first)
    assert "x=74, y=60" in page.locator("#heat-info").inner_text()
    a, b = page.request.get(first).body(), page.request.get(second).body()
    assert a[:8] == b"\x89PNG\r\n\x1a\n" and b[:8] == b"\x89PNG\r\n\x1a\n"
    assert a != b
    assert page.locator("#heat-lr img").first.get_attribute("src") != first_lr

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FEATUP_SERVE_SCREENSHOT"):  # the README's picture: the top of the page, 256 colors
        from PIL import Image

        with Image.open(shot) as im:
            top = im.crop((0, 0, im.width, min(im.height, 1020))).convert("RGB")
            top = top.resize((top.width * 3 // 4, top.height * 3 // 4), Image.Resampling.LANCZOS)
            top.quantize(256, method=Image.Quantize.MEDIANCUT).save(
                os.environ["FEATUP_SERVE_SCREENSHOT"], optimize=True
            )
    assert page.outside == [], f"the page fetched from outside the server: {page.outside}"


def test_bad_upload_shows_a_message_in_the_page(page, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    page.locator("#input-image input[type=file]").set_input_files(str(text))
    page.locator("#run").click()
    page.get_by_text("not an image", exact=False).first.wait_for()
    # the server keeps serving: a real photo works afterwards in the same page
    _upload_and_run(page, photo_path("coffee"))
    assert "/gradio_api/file=" in _src_change(page, "#panel-1", None)
    assert page.outside == []


def test_example_photo_implicit_fit_progress_and_cancel(page):
    # an example photo (bundled with scikit-image) goes into the input with one click
    page.locator("button.gallery-item").first.click()
    page.locator("#input-image img").first.wait_for()
    assert "chelsea" in page.locator("#input-image img").first.get_attribute("src")
    page.locator("#upsampler").get_by_text("implicit").click()
    page.locator("#run").click()
    page.get_by_text("implicit fit: step", exact=False).first.wait_for()  # progress is shown per step
    page.locator("#cancel").click()
    message = page.get_by_text("implicit fit cancelled after", exact=False).first
    message.wait_for()
    assert "nothing was cached" in message.inner_text()
    assert page.outside == []
