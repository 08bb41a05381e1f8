"""The app on the tiny SD3 in a real headless Chromium at 1280x800, with a 35-word caption: every flow once.

Generate (buttons disabled while it runs), click words (shift-click for several), click a patch, choose other
blocks/steps/direction/prompt without regenerating, compare, NCUT, export; the images, the word rows and the
heatmap stay inside the viewport. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sd3_lora_celeba.testing.tokenizers import EXAMPLE_CAPTION
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
VIEWPORT = {"width": 1280, "height": 800}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(explorer):
    config = VisualizeConfig(
        max_sequence_length=64, num_inference_steps=2, guidance_scale=4.0, port=_free_port()
    )
    app = build_app(config, explorer=explorer)
    launch(app, config, block=False)
    yield f"http://{config.host}:{config.port}/"
    app.close()


def _inside_viewport(page, selector: str) -> None:
    boxes = [page.locator(selector).nth(i).bounding_box() for i in range(page.locator(selector).count())]
    assert boxes, selector
    for box in boxes:
        assert box is not None and box["y"] >= 0 and box["x"] >= 0, (selector, box)
        assert box["y"] + box["height"] <= VIEWPORT["height"], (selector, box)
        assert box["x"] + box["width"] <= VIEWPORT["width"], (selector, box)


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
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(running_app)
            _generate_and_explore(page, expect)
            _compare_ncut_export(page, expect)
            _other_sessions_and_errors(browser, page, running_app, expect)
        finally:
            browser.close()
    assert (ARTIFACTS / "visualize_1280x800.png").stat().st_size > 10_000
    assert (ARTIFACTS / "visualize_1920x1080.png").stat().st_size > 10_000


def _generate_and_explore(page, expect) -> None:
    message = page.locator("#message")
    # LoRA folders that do not fit, are corrupt or do not exist are named in a banner; the app runs with the others.
    expect(page.locator("#banner")).to_contain_text("has shape [2, 35], the model needs [2, 32]")
    expect(page.locator("#banner")).to_contain_text("corrupt or truncated")
    expect(page.locator("#banner")).to_contain_text("checkpoint-none")
    expect(page.locator("#capture-note")).to_contain_text(
        "Default capture, chosen for speed: blocks 6,10,13,17"
    )

    page.locator("#prompt textarea").fill(EXAMPLE_CAPTION + "\na man with a beard and glasses")
    page.locator("#capture-blocks input, #capture-blocks textarea").first.fill("8-12")
    page.locator("#generate").click()
    expect(page.locator("#generate")).to_be_disabled()  # busy: a second click cannot queue a second run
    expect(message).to_contain_text("Generated with seed 0; captured blocks 8-12 at steps 1")
    expect(message).to_contain_text("MiB")  # the session memory is stated
    expect(page.locator("#generate")).to_be_enabled()

    clip_row, t5_row = page.locator("#words .word-row").nth(0), page.locator("#words .word-row").nth(1)
    expect(clip_row).to_contain_text("CLIP")
    assert (
        clip_row.locator(".word").count() == 41 and t5_row.locator(".word").count() == 41
    )  # words, not pieces
    clip_row.locator(".word", has_text="smiling").click()
    expect(message).to_contain_text("Heatmap of 'smiling' (CLIP)")
    t5_row.locator(".word", has_text="eyebrows").click(modifiers=["Shift"])
    expect(message).to_contain_text("Heatmap of 'smiling' (CLIP), 'eyebrows' (T5)")
    expect(page.locator("#scale .scale")).to_be_visible()
    # Everything in view at 1280x800 without scrolling: the images with the heatmap, the scale, both word rows.
    page.evaluate("window.scrollTo(0, 0)")
    _inside_viewport(page, "#images img")
    _inside_viewport(page, "#words .word-row")
    _inside_viewport(page, "#scale .scale")
    _inside_viewport(page, "#message")

    image = page.locator("#images img")
    box = image.bounding_box()
    # 3 images side by side, 4x4 patches each: 40% across is image 1 (the first LoRA), patch column 0 or 1.
    image.click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.9})
    expect(message).to_contain_text("Patch (row 3, column 1) clicked in 'checkpoint-000010'")
    page.screenshot(path=str(ARTIFACTS / "visualize_1280x800.png"))

    # Other blocks, steps and direction among the captured ones: redrawn, not regenerated.
    before = image.get_attribute("src")
    page.locator("#show-blocks input, #show-blocks textarea").first.fill("10-20")
    page.locator("#show-blocks input, #show-blocks textarea").first.press("Enter")
    expect(message).to_contain_text("Showing blocks 10-12, steps 1 (no regeneration)")
    expect(image).not_to_have_attribute("src", before)
    page.locator("#show-blocks input, #show-blocks textarea").first.fill("0-10000000")
    page.locator("#show-blocks input, #show-blocks textarea").first.press("Enter")
    expect(message).to_contain_text("0-10000000 out of range; choose indices in 0..23")
    page.locator("#show-blocks input, #show-blocks textarea").first.fill("")
    page.locator("#show-blocks input, #show-blocks textarea").first.press("Enter")
    page.locator("#direction label", has_text="text -> image").click()
    expect(message).to_contain_text("Showing blocks 8-12")
    # The second prompt: its own word rows.
    page.locator("#prompt-choice label", has_text="1").click()
    expect(page.locator("#words .word-row").nth(0)).to_contain_text("beard")
    page.locator("#prompt-choice label", has_text="0").click()
    expect(page.locator("#words .word-row").nth(0)).to_contain_text("eyebrows")


def _compare_ncut_export(page, expect) -> None:
    message = page.locator("#message")
    page.locator("#words .word-row").nth(0).locator(".word", has_text="hair").click()
    expect(message).to_contain_text("Heatmap of 'hair' (CLIP)")
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#diff img")).to_be_visible()
    expect(page.locator("#entropy")).to_contain_text("checkpoint-000020")

    page.get_by_role("tab", name="NCUT").click()
    page.locator("#run-ncut").click()
    expect(page.locator("#ncut img")).to_be_visible()
    expect(message).to_contain_text("NCUT of output with 15 eigenvectors")
    expect(message).to_contain_text(
        "only 16 tokens per image"
    )  # colours cannot compare at this size: said so

    page.get_by_role("tab", name="Export").click()
    page.locator("#export").click()
    expect(message).to_contain_text(
        "Exported the-image-shows-a-young-woman-with-long_seed0_blocks8-12_steps1"
    )
    for ext in (".png", ".svg", ".npz"):
        expect(page.locator("#export-files")).to_contain_text(ext)

    # At 1920x1080 the images use the width.
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.evaluate("window.scrollTo(0, 0)")
    expect(page.locator("#images img")).to_be_visible()
    time.sleep(0.5)
    assert page.locator("#images img").bounding_box()["width"] > 1200
    page.screenshot(path=str(ARTIFACTS / "visualize_1920x1080.png"))
    page.set_viewport_size(VIEWPORT)
    assert "Error:" not in message.inner_text()


def _other_sessions_and_errors(browser, page, url, expect) -> None:
    # Another browser session starts empty: results live in per-session state.
    other = browser.new_context(viewport=VIEWPORT).new_page()
    other.goto(url)
    expect(other.locator("#generate")).to_be_visible()
    time.sleep(1.0)
    assert other.locator("#words .word").count() == 0
    # A bad seed and an empty prompt are reported in the page, escaped, and the app keeps serving.
    page.locator("#seed input").fill("100000000000000000000")
    page.locator("#generate").click()
    expect(page.locator("#message")).to_contain_text("choose a whole number in 0..4294967295")
    expect(page.locator("#generate")).to_be_enabled()
    page.locator("#seed input").fill("0")
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    expect(page.locator("#message")).to_contain_text("the prompt is empty")
    expect(page.locator("#images img")).to_be_visible()  # the previous result stays
