"""The chat page at / in a real browser: Debian's Chromium driven by Playwright for Python (no browser download).
Under CI (CI=true) a missing Chromium or Playwright fails the test; elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import thinking
from thinking import GREET

CHROMIUM = os.environ.get("CHATFT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# as root, on a machine whose network is closed: no sandbox, no GPU, and none of the background connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
SCREENSHOT = os.environ.get(
    "CHATFT_SCREENSHOT"
)  # where to keep the screenshot (default: the test's tmp folder)

# the tiny reasoning model and its server (tests/thinking.py)
thinking_model, thinking_served = thinking.thinking_model, thinking.thinking_served


# the lengths the base column's answer is seen with, as the page updates it
WATCH_TEXT = """() => {
  window.seenLengths = [];
  new MutationObserver(() => {
    const text = document.querySelector('.column[data-model="base"] .msg.assistant .text');
    const n = text ? text.textContent.length : 0;
    if (n && n !== window.seenLengths[window.seenLengths.length - 1]) window.seenLengths.push(n);
  }).observe(document.getElementById("columns"), { childList: true, subtree: true, characterData: true });
}"""


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser test (scripts/install_test_tools.sh installs it)")
    pytest.skip(reason)


@pytest.fixture
def browser_page(tmp_path: Path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    if not Path(CHROMIUM).is_file():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 720},
            timeout=30_000,
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(15_000)
        try:
            yield page
        finally:
            context.close()


def test_chat_page_streams_an_answer_then_compares_two_models(browser_page, served, tmp_path):
    page = browser_page
    streamed = []
    page.on(
        "response",
        lambda r: (
            streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/chat/completions")
            else None
        ),
    )
    page.goto(served.url + "/")
    page.wait_for_function("document.querySelectorAll('#model-a option').length === 2")
    assert page.locator("#model-a").input_value() == "tuned"

    page.fill("#system", "")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    reply = page.locator('.msg.assistant[data-done="1"]')
    reply.wait_for()
    assert reply.locator(".text").inner_text() == "hello there!"
    assert page.locator(".msg.user .text").inner_text() == "hi"
    assert len(streamed) == 1 and streamed[0].startswith("text/event-stream")  # server-sent events
    assert page.locator("#status").inner_text() == ""

    page.check("#compare")  # a new chat, two columns: tuned and base
    page.select_option("#model-b", "base")
    assert page.locator(".column").count() == 2
    page.evaluate(WATCH_TEXT)
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done=\"1\"]').length === 2")
    answers = {
        col.get_attribute("data-model"): col.locator(".msg.assistant .text").inner_text()
        for col in page.locator(".column").all()
    }
    assert answers["tuned"] == "hello there!"
    assert answers["base"].count("la") > 10  # the other model's own answer, cut at the token limit
    seen = page.evaluate("window.seenLengths")  # the base's answer grew on the page piece by piece
    assert len(seen) > 5 and seen == sorted(seen), seen
    assert "cut at the token or time limit" in page.locator('.column[data-model="base"] .meta').inner_text()
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator(".column").count() == 2


def test_chat_page_folds_the_thinking_in_each_column(browser_page, thinking_served):
    """A reasoning model's delta.reasoning_content goes into a folded <details> above its answer, in compare mode
    too; "opener" is the same model with a prompt that opens the think block (DeepSeek-R1 style)."""
    page = browser_page
    page.goto(thinking_served.url + "/")
    page.wait_for_function("document.querySelectorAll('#model-a option').length === 2")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    reply = page.locator('.msg.assistant[data-done="1"]')
    reply.wait_for()
    thinking = reply.locator("details.thinking")
    assert reply.locator(".text").inner_text() == "hello there!"
    assert thinking.evaluate("d => d.open") is False and not thinking.locator(".reasoning").is_visible()
    assert thinking.locator(".reasoning").text_content() == GREET
    assert thinking.locator("summary").inner_text() == f"Thought ({len(GREET)} characters)"
    thinking.locator("summary").click()
    assert thinking.locator(".reasoning").is_visible()

    page.check("#compare")
    page.select_option("#model-a", "thinker")
    page.select_option("#model-b", "opener")
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done=\"1\"]').length === 2")
    for column in page.locator(".column").all():
        folded = column.locator(".msg.assistant details.thinking")
        assert folded.evaluate("d => d.open") is False, column.get_attribute("data-model")
        assert folded.locator(".reasoning").text_content() == GREET
        assert column.locator(".msg.assistant .text").inner_text() == "hello there!"
