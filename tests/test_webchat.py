"""The web chat page end to end: headless Debian Chromium, driven by Playwright, against a real server."""

import shutil

import httpx
import pytest

from conftest import dev_import
from serve_util import API_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The network is closed here: without these Chromium stalls on lookups and update checks.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

sync_api = dev_import("playwright.sync_api")

# Counts how many times the reply bubble's text changed before it was done: more than one means streamed.
WATCH = """() => {
  window.__updates = 0;
  new MutationObserver(() => {
    const last = [...document.querySelectorAll('.msg.assistant')].pop();
    if (last && !last.dataset.done && last.textContent) window.__updates += 1;
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def page(served):
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium chromium-driver)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(served.url + "/")
        pg.fill("#api-key", API_KEY)
        pg.dispatch_event("#api-key", "change")
        yield pg
        browser.close()


def _send(page, text: str):
    page.fill("#input", text)
    page.click("#send")


def _assistant(page):
    return page.locator(".msg.assistant")


def test_typed_message_gets_a_streamed_reply_over_several_turns(page, served):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.evaluate(WATCH)
    _send(page, "Who was born in the city?")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    reply = _assistant(page).nth(0).get_attribute("data-reply")
    assert reply and page.evaluate("window.__updates") > 1  # the text grew piece by piece
    # the same request through the API gives the same greedy reply
    api = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "model": served.model, "messages": [{"role": "user", "content": "Who was born in the city?"}],
        "temperature": 0, "top_p": 0.95, "max_tokens": 24}, timeout=60).json()
    assert reply == api["choices"][0]["message"]["content"]

    _send(page, "And then?")  # a second turn: the page sends the whole conversation
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='1']")
    assert _assistant(page).count() == 2 and page.locator(".msg.user").count() == 2
    assert page.locator(".msg.error").count() == 0


# Clicks Stop from inside the page the moment the first reply text shows: no race with a fast model.
STOP_ON_FIRST_TEXT = """() => {
  const obs = new MutationObserver(() => {
    const last = document.querySelector('.msg.assistant');
    if (last && last.textContent) { obs.disconnect(); document.getElementById('stop').click(); }
  });
  obs.observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_stop_button_ends_a_reply_and_the_chat_goes_on(page, served):
    page.click("#new-chat")
    page.fill("#temperature", "0.8")
    page.fill("#max-tokens", "120")
    page.evaluate(STOP_ON_FIRST_TEXT)
    _send(page, "Tell me a long story.")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert page.locator(".msg.assistant .meta").inner_text().startswith("stopped")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    for _ in range(100):  # the server sees the closed stream and frees the slot
        if httpx.get(served.url + "/health").json()["running"] == 0:
            break
        page.wait_for_timeout(100)
    assert httpx.get(served.url + "/health").json()["running"] == 0
    page.fill("#max-tokens", "8")
    _send(page, "Hello")
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='1']")
    assert _assistant(page).nth(1).get_attribute("data-reply")
