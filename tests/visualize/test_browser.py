"""The app on the tiny SD3, driven in a real headless Chromium: generate, click a token and a patch, run NCUT."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sd3_lora_celeba.visualize.app import VisualizeConfig, build_app, launch

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
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
TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(explorer):
    config = VisualizeConfig(
        max_sequence_length=32, num_inference_steps=2, guidance_scale=4.0, port=_free_port()
    )
    app = build_app(config, explorer=explorer)
    launch(app, config, block=False)
    yield f"http://{config.host}:{config.port}/"
    app.close()


@pytest.mark.browser
def test_app_in_headless_chromium(running_app):
    assert CHROMIUM.is_file(), (
        f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run the browser test"
    )
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(running_app)
            # LoRA folders that do not fit or do not exist are reported in a banner; the app runs with the others.
            expect(page.locator("#banner")).to_contain_text("does not fit this model")
            expect(page.locator("#banner")).to_contain_text("checkpoint-none")

            page.locator("#prompt textarea").fill("a photo of a smiling woman with blond hair")
            page.locator("#generate").click()
            expect(page.locator("#images img")).to_be_visible()
            expect(page.locator("#message")).to_contain_text("Generated with seed 0")

            page.locator("#tokens label", has_text="smiling [CLIP 5]").click()
            expect(page.locator("#heatmap img")).to_be_visible()
            expect(page.locator("#message")).to_contain_text("Heatmap of 'smiling'")

            image = page.locator("#images img")
            box = image.bounding_box()
            # 3 images side by side, 4x4 patches each: 45% across is image 1 (the first LoRA), patch column 1.
            image.click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.2})
            expect(page.locator("#patch-plot img")).to_be_visible()
            expect(page.locator("#message")).to_contain_text(
                "Patch (row 0, column 1) clicked in 'checkpoint-000010'"
            )

            page.locator("#run-ncut").click()
            expect(page.locator("#ncut img")).to_be_visible()
            expect(page.locator("#message")).to_contain_text("NCUT with 20 eigenvectors")
            expect(page.locator("#lora-norms img")).to_be_visible()
            # Every figure downloads as a PNG.
            with page.expect_download() as download:
                page.locator("#heatmap [data-testid=download-link]").click()
            download.value.save_as(ARTIFACTS / "visualize_heatmap.png")
            assert (ARTIFACTS / "visualize_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            page.screenshot(path=str(ARTIFACTS / "visualize_app.png"), full_page=True)
            assert "Error:" not in page.locator("#message").inner_text()

            # Another browser session starts empty: results live in per-session state.
            other = browser.new_context().new_page()
            other.goto(running_app)
            expect(other.locator("#generate")).to_be_visible()
            time.sleep(1.0)
            assert other.locator("#images img").count() == 0

            # An empty prompt is reported in the page and the app keeps serving.
            page.locator("#prompt textarea").fill("")
            page.locator("#generate").click()
            expect(page.locator("#message")).to_contain_text("the prompt is empty")
            expect(page.locator("#images img")).to_be_visible()  # the previous result stays
        finally:
            browser.close()
    assert (ARTIFACTS / "visualize_app.png").stat().st_size > 10_000
