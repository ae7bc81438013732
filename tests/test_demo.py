"""The Gradio demo in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The demo runs the Tiny golden checkpoint on a free 127.0.0.1 port; the browser may reach nothing else (every
other request is aborted and recorded). Screenshots go to test-output/demo/ (gitignored), or
$DEEPSEEK_VL_TEST_OUTPUT/demo/.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from golden import GOLDEN, checkpoint
from PIL import Image
from test_server import GIRAFFES, GROUNDED, cli, forced_answer, free_port, tiny_chat

from deepseek_vl.grounding import label_colors

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import BrowserContext, Page, Route, expect, sync_playwright

from deepseek_vl.serve.demo import BUSY, build_demo, launch

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
]  # fmt: skip
OUTPUT = Path(os.environ.get("DEEPSEEK_VL_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output")) / "demo"
TIMEOUT_MS = 30_000
# Records the chat's text every time it changes, so the test can see the answer arrive in pieces.
WATCH_CHAT = """() => {
    window.chatTexts = [];
    const chat = document.querySelector('#chatbot');
    new MutationObserver(() => window.chatTexts.push(chat.innerText))
        .observe(chat, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    port = free_port()
    demo = build_demo(tiny_chat(), examples_dir=GOLDEN / "images", max_images=3)
    launch(demo, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def browser(demo_url: str) -> Iterator[tuple[BrowserContext, list[str]]]:
    """A fresh Chromium profile; requests that leave the demo's address are aborted and listed."""
    elsewhere: list[str] = []

    def local_only(route: Route) -> None:
        if route.request.url.startswith(demo_url) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1400},
        )  # fmt: skip
        context.route("**/*", local_only)
        yield context, elsewhere
        context.close()


@pytest.fixture
def page(browser: tuple[BrowserContext, list[str]], demo_url: str) -> Iterator[Page]:
    context, elsewhere = browser
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(demo_url)
    page.wait_for_selector("#prompt textarea")
    yield page
    page.close()
    assert elsewhere == [], f"the demo page tried to reach other hosts: {elsewhere}"


def screenshot(page: Page, name: str) -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def set_max_new_tokens(page: Page, value: int) -> None:
    box = page.locator("#max-new-tokens input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_upload_ask_stream_and_see_boxes(page: Page, demo_url: str):
    page.set_input_files("#images input[type=file]", str(GIRAFFES))
    expect(page.locator("#images img").first).to_be_visible()
    page.fill("#prompt textarea", "<|ref|>The giraffe at the back<|/ref|>.")
    page.evaluate(WATCH_CHAT)
    with forced_answer(tiny_chat(), GROUNDED, step_seconds=0.05):
        page.click("#send")
        expect(page.locator("#annotated img")).to_be_visible()

    bot = page.locator("#chatbot .bot").last
    expect(bot).to_contain_text("[[100, 200, 500, 999]]")
    answers = [text.rsplit("<|ref|>The giraffe at the back<|/ref|>.", 1)[-1] for text in page.evaluate("chatTexts")]
    partial = [a for a in answers if "<|ref|>" in a and "<|/det|>" not in a]
    assert partial, "the answer was not streamed: no partial answer was ever shown"
    expect(page.locator("#status")).to_contain_text("Boxes: The giraffe at the back [100, 200, 500, 999]")
    expect(page.locator("#annotated")).to_contain_text("Grounding: The giraffe at the back")
    screenshot(page, "grounding.png")

    drawn = Image.open(
        io.BytesIO(httpx.get(page.locator("#annotated img").get_attribute("src"), trust_env=False).content)
    )
    original = Image.open(GIRAFFES)
    assert drawn.size == original.size
    left_edge = (round(100 / 999 * original.width), round(600 / 999 * original.height))
    red = label_colors(["The giraffe at the back"])["The giraffe at the back"]
    assert drawn.convert("RGB").getpixel(left_edge) == red  # the box is drawn where the model put it


def test_example_click_and_second_turn(page: Page):
    set_max_new_tokens(page, 8)
    page.locator(".gallery-item, [data-testid='examples'] tr, table tbody tr").filter(
        has_text="Describe each stage"
    ).first.click()
    expect(page.locator("#prompt textarea")).to_have_value("Describe each stage of this image in detail.")
    expect(page.locator("#images img").first).to_be_visible()
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("Turn 1:")
    expect(page.locator("#status")).to_contain_text("+ 8 answer tokens (stopped at max new tokens)")
    expect(page.locator("#chatbot .bot")).to_have_count(1)
    page.fill("#prompt textarea", "And the last stage?")
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("Turn 2:")
    expect(page.locator("#chatbot .bot")).to_have_count(2)
    expect(page.locator("#chatbot .user")).to_contain_text(["Describe each stage", "And the last stage?"])
    expect(page.locator("#chatbot .user").first.locator("img")).to_be_visible()  # the turn shows its image
    screenshot(page, "two-turns.png")


def test_stop_ends_the_answer(page: Page):
    page.fill("#prompt textarea", "Count to one hundred.")
    with forced_answer(tiny_chat(), " ".join(str(n) for n in range(1, 101)), step_seconds=0.05):
        page.click("#send")
        expect(page.locator("#chatbot .bot")).to_contain_text("1 2 3")
        page.click("#stop")
        expect(page.locator("#status")).to_contain_text("(stopped)")
    assert "100" not in page.locator("#chatbot .bot").inner_text()


def test_enter_and_clear_while_an_answer_streams(page: Page):
    """A second question is refused while the answer streams; Clear stops the answer and the chat stays empty."""
    set_max_new_tokens(page, 300)
    page.fill("#prompt textarea", "Count to one hundred.")
    with forced_answer(tiny_chat(), " ".join(str(n) for n in range(1, 101)), step_seconds=0.05):
        page.click("#send")
        expect(page.locator("#chatbot .bot")).to_contain_text("1 2 3")
        page.fill("#prompt textarea", "Hello?")
        page.press("#prompt textarea", "Enter")
        expect(page.locator("#status")).to_have_text(BUSY)
        page.click("#clear")
        expect(page.locator("#chatbot .bot")).to_have_count(0)
        page.wait_for_timeout(500)  # an update of the stopped answer arriving late would show it again
        expect(page.locator("#chatbot .bot")).to_have_count(0)
    set_max_new_tokens(page, 2)
    page.fill("#prompt textarea", "Hi")
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("Turn 1:")
    expect(page.locator("#chatbot .user")).to_have_text(["Hi"])


def test_bad_upload_is_explained(page: Page, tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    page.set_input_files("#images input[type=file]", str(broken))
    page.fill("#prompt textarea", "What is this?")
    page.click("#send")
    expect(page.locator("#status")).to_have_text(
        "⚠️ Could not use the upload 'broken.png': 'broken.png' is not a readable image (unknown or corrupt format)."
    )
    expect(page.locator("#chatbot .bot")).to_have_count(0)
    screenshot(page, "bad-upload.png")


def test_cli_demo(tmp_path: Path):
    """`deepseek-vl2 demo` as a user starts it serves the page."""
    port = free_port()
    args = ("demo", "--model", str(checkpoint("tiny")), "--port", str(port), "--examples-dir", str(GOLDEN / "images"))
    with cli(*args, url=f"http://127.0.0.1:{port}/", log=tmp_path / "demo.log"):
        page = httpx.get(f"http://127.0.0.1:{port}/", trust_env=False)
        assert page.status_code == 200 and "DeepSeek-VL2" in page.text
