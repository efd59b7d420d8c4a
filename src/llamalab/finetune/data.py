"""The data side of fine-tuning: chat records -> token samples with loss masks -> packed batches.

Records (one JSON object per line of a ``.jsonl`` file):

- a conversation: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- a prompt/completion pair: ``{"prompt": str, "completion": str}``, i.e. one user turn and one
  assistant turn;
- a preference pair: ``{"prompt": str}`` or ``{"messages": [...]}`` (ending with a user turn),
  plus ``"chosen": str``, ``"rejected": str``, optional ``"margin": number`` and optional
  ``"preference": "significantly_better"|"better"|"slightly_better"|"negligibly_better"``
  (Llama 2's four levels), optional ``"edited": str`` (Llama 3: an annotator's improvement of the
  chosen answer; reward models rank edited > chosen > rejected, DPO ignores it).

A bad record is never fatal: it is set aside as (file, line, reason) in a `DataSummary`, which
counts what was kept and groups what was set aside by reason.

Rendering goes through `llamalab.generate.chat.encode_chat`, the renderer ``llamalab chat`` and
``llamalab serve`` use, so what is trained is what is served. The assistant turns are found by
rendering prefixes of the conversation: the tokens of assistant message ``i`` are those that
``messages[:i+1]`` (closed) adds to ``messages[:i]`` + the generation prompt. That only works when
the shorter rendering's ids are a prefix of the longer one's (a template that rewrites earlier
turns, or a BPE merge across the boundary, breaks it); it is checked, and a record that breaks
it is set aside.

Token conventions: a `Sample` holds the ids of one rendered conversation and, per token, whether
it is a loss target (``loss_mask``) and whether it is a chat-format token (``formatting``: headers,
end-of-turn and ``<|im_start|>``-style markers, any text the template adds, as opposed to message
content). Rows and batches hold ``labels``: ``labels[t]`` is the target for the logits at slot
``t``, i.e. ``tokens[t+1]`` when that token carries loss and belongs to the same sample, else -100
(``ignore_index``). So a model's ``forward(tokens, input_pos, doc_ids)`` lines up with ``labels``
without any further shift.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np
import torch
from torch import Tensor

from llamalab.generate.chat import chat_format, chat_stop_ids, encode_chat

__all__ = [
    "IGNORE_INDEX",
    "PREFERENCE_LEVELS",
    "REASONS",
    "TRAIN_ON",
    "Batch",
    "DataSummary",
    "EncodedChat",
    "PreferenceBatch",
    "PreferencePair",
    "PreferenceSample",
    "RecordError",
    "Row",
    "Sample",
    "SetAside",
    "SFTRecord",
    "collate",
    "collate_preferences",
    "SharedPromptBatch",
    "share_prompts",
    "shared_prefix",
    "encode_conversation",
    "encode_preference",
    "load_preference_samples",
    "load_sft_samples",
    "mix_sources",
    "pack",
    "packing_efficiency",
    "pad_id_for",
    "parse_preference_record",
    "parse_sft_record",
    "read_preference_records",
    "read_sft_records",
    "sample_rows",
    "tokenize_preferences",
    "tokenize_sft",
]

Message = dict[str, str]
TrainOn = Literal["assistant", "last", "all"]
TRAIN_ON: tuple[str, ...] = ("assistant", "last", "all")
ROLES = ("system", "user", "assistant")
PREFERENCE_LEVELS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")
IGNORE_INDEX = -100  # torch's cross_entropy default, and train/loss.py's

# Why a record was set aside. The summary groups by these exact strings; the detail (which
# message, how long, the first differing token) goes with each record.
NOT_UTF8 = "not UTF-8"
NOT_JSON = "not JSON"
NOT_OBJECT = "not a JSON object"
UNKNOWN_SHAPE = "unknown record shape"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
EMPTY_CONVERSATION = "empty conversation"
MISSING_ROLE = "missing role"
UNKNOWN_ROLE = "unknown role"
MISSING_CONTENT = "missing content"
NON_STRING_CONTENT = "non-string content"
EMPTY_ASSISTANT = "empty assistant turn"
NOT_ENDING_WITH_ASSISTANT = "conversation does not end with an assistant turn"
PROMPT_NOT_ENDING_WITH_USER = "prompt does not end with a user turn"
ASSISTANT_BEFORE_USER = "assistant turn before any user turn"
IDENTICAL_PAIR = "chosen and rejected are identical"
UNKNOWN_PREFERENCE = "unknown preference level"
FORMAT_REJECTS = "chat format rejects the conversation"
PREFIX_BROKEN = "chat template breaks the prefix property"
NO_LOSS_TOKENS = "no loss-carrying tokens"
OVER_LONG = "over-long"
REASONS: tuple[str, ...] = (
    NOT_UTF8, NOT_JSON, NOT_OBJECT, UNKNOWN_SHAPE, MISSING_FIELD, WRONG_TYPE, EMPTY_CONVERSATION, MISSING_ROLE,
    UNKNOWN_ROLE, MISSING_CONTENT, NON_STRING_CONTENT, EMPTY_ASSISTANT, NOT_ENDING_WITH_ASSISTANT,
    PROMPT_NOT_ENDING_WITH_USER, ASSISTANT_BEFORE_USER, IDENTICAL_PAIR, UNKNOWN_PREFERENCE, FORMAT_REJECTS,
    PREFIX_BROKEN, NO_LOSS_TOKENS, OVER_LONG,
)


# --------------------------------------------------------------------------------------------
# Set-aside records and the summary
# --------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A record that cannot be trained on: ``reason`` is one of `REASONS`, ``detail`` says where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SetAside:
    """One record left out: its file, 1-based line number, reason (one of `REASONS`) and detail."""

    file: str
    line: int
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class DataSummary:
    """What reading and tokenising kept and set aside.

    ``seen`` counts non-blank lines; every one is either kept or in ``set_aside``. ``tokens`` and
    ``loss_tokens`` count the kept samples' ids and loss targets (filled in by tokenising).
    """

    files: list[str] = field(default_factory=list)
    seen: int = 0
    set_aside: list[SetAside] = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0

    @property
    def kept(self) -> int:
        """Records that made it through."""
        return self.seen - len(self.set_aside)

    def add(self, file: str, line: int, reason: str, detail: str = "") -> None:
        """Set one record aside."""
        self.set_aside.append(SetAside(file, line, reason, detail))

    @classmethod
    def merged(cls, summaries: Sequence[DataSummary]) -> DataSummary:
        """One summary of several (e.g. the sources of a mixture)."""
        out = cls()
        for x in summaries:
            out.files += x.files
            out.seen += x.seen
            out.set_aside += x.set_aside
            out.tokens += x.tokens
            out.loss_tokens += x.loss_tokens
        return out

    def by_reason(self) -> dict[str, int]:
        """Set-aside counts per reason, most frequent first."""
        return dict(Counter(s.reason for s in self.set_aside).most_common())

    def to_dict(self, examples: int = 3) -> dict[str, Any]:
        """A JSON-able form for a run's summary file: counts, and up to ``examples`` records per reason."""
        shown: dict[str, list[str]] = {}
        for s in self.set_aside:
            if len(shown.setdefault(s.reason, [])) < examples:
                shown[s.reason].append(str(s))
        return {"files": list(self.files), "seen": self.seen, "kept": self.kept, "set_aside": len(self.set_aside),
                "by_reason": self.by_reason(), "examples": shown, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens}

    def format(self, examples: int = 1) -> str:
        """Human-readable lines: the counts, then each reason with its count and first ``examples`` records."""
        counts = f" ({self.tokens:,} tokens, {self.loss_tokens:,} with loss)" if self.tokens else ""  # (prompts: none)
        lines = [f"kept {self.kept:,} of {self.seen:,} records{counts}; set aside {len(self.set_aside):,}"]
        for reason, n in self.by_reason().items():
            first = [str(s) for s in self.set_aside if s.reason == reason][:examples]
            lines.append(f"  {n:>7,}  {reason}" + (f"   e.g. {'; '.join(first)}" if first else ""))
        return "\n".join(lines)


def _iter_json_lines(paths: Iterable[str | Path], summary: DataSummary) -> Iterator[tuple[str, int, Any]]:
    """(file, line number, parsed value) for every non-blank line; lines that do not parse are set aside.

    Lines are decoded one by one (not the whole file as UTF-8) so that one bad byte sequence costs
    one record, not the file. A missing file is an error: that is a configuration mistake.
    """
    for path in paths:
        path = Path(path)
        name = str(path)
        summary.files.append(name)
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                summary.seen += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    summary.add(name, lineno, NOT_UTF8, str(e))
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    summary.add(name, lineno, NOT_JSON, e.msg)
                    continue
                yield name, lineno, value


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTRecord:
    """One validated SFT conversation (only ``role`` and ``content`` of each message are kept)."""

    messages: tuple[Message, ...]
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class PreferencePair:
    """One validated preference pair: the prompt conversation (ending with a user turn) and two answers."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    margin: float | None = None
    preference: str | None = None
    file: str = ""
    line: int = 0
    edited: str | None = None  # Llama 3: an annotator's edit of the chosen answer (edited > chosen > rejected)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages(value: Any) -> tuple[Message, ...]:
    """Validate a ``messages`` list; only role and content are kept (other keys such as OpenAI's
    ``name`` are dropped, so no template sees fields we did not check)."""
    if not isinstance(value, list):
        raise RecordError(WRONG_TYPE, f"'messages' is a {_type_name(value)}, expected a list")
    if not value:
        raise RecordError(EMPTY_CONVERSATION, "'messages' is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(WRONG_TYPE, f"message {i} is a {_type_name(m)}, expected an object")
        if "role" not in m:
            raise RecordError(MISSING_ROLE, f"message {i}")
        role = m["role"]
        if role not in ROLES:
            raise RecordError(UNKNOWN_ROLE, f"message {i} has role {role!r}; expected system, user or assistant")
        if "content" not in m:
            raise RecordError(MISSING_CONTENT, f"message {i}")
        content = m["content"]
        if not isinstance(content, str):
            raise RecordError(NON_STRING_CONTENT, f"message {i} ({role}) has {_type_name(content)} content")
        # Llama 2/3 strip every message, so whitespace-only is empty there too.
        if role == "assistant" and not content.strip():
            raise RecordError(EMPTY_ASSISTANT, f"message {i}")
        out.append({"role": role, "content": content})
    return tuple(out)


def _check_user_first(messages: Sequence[Message]) -> None:
    # An answer needs a question: the first assistant turn must follow a user turn (a system
    # prompt alone is not a prompt, and rendering "nothing + generation prompt" is undefined).
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return
        if m["role"] == "assistant":
            raise RecordError(ASSISTANT_BEFORE_USER, f"message {i}")


def parse_sft_record(value: Any) -> tuple[Message, ...]:
    """The conversation of one SFT record (``messages`` or ``prompt``/``completion``).

    Raises `RecordError` naming the reason (one of `REASONS`) for anything that cannot be trained on.
    """
    if not isinstance(value, dict):
        raise RecordError(NOT_OBJECT, f"a JSON {_type_name(value)}")
    if "chosen" in value or "rejected" in value:
        raise RecordError(UNKNOWN_SHAPE, "a preference pair; SFT takes 'messages' or 'prompt' + 'completion'")
    if "messages" in value:
        messages = _messages(value["messages"])
    elif "prompt" in value or "completion" in value:
        for key in ("prompt", "completion"):
            if key not in value:
                raise RecordError(MISSING_FIELD, f"{key!r}")
            if not isinstance(value[key], str):
                raise RecordError(WRONG_TYPE, f"{key!r} is a {_type_name(value[key])}, expected a string")
        if not value["completion"].strip():
            raise RecordError(EMPTY_ASSISTANT, "'completion' is empty")
        messages = ({"role": "user", "content": value["prompt"]},
                    {"role": "assistant", "content": value["completion"]})
    else:
        raise RecordError(UNKNOWN_SHAPE, f"keys {sorted(value)}; expected 'messages' or 'prompt' + 'completion'")
    if messages[-1]["role"] != "assistant":
        raise RecordError(NOT_ENDING_WITH_ASSISTANT, f"the last message is the {messages[-1]['role']}'s")
    _check_user_first(messages)
    return messages


def parse_preference_record(value: Any) -> PreferencePair:
    """The preference pair of one record (without file/line). Raises `RecordError` with the reason."""
    if not isinstance(value, dict):
        raise RecordError(NOT_OBJECT, f"a JSON {_type_name(value)}")
    if "prompt" in value and "messages" in value:
        raise RecordError(UNKNOWN_SHAPE, "both 'prompt' and 'messages'; give one")
    if "messages" in value:
        prompt = _messages(value["messages"])
    elif "prompt" in value:
        if not isinstance(value["prompt"], str):
            raise RecordError(WRONG_TYPE, f"'prompt' is a {_type_name(value['prompt'])}, expected a string")
        prompt = ({"role": "user", "content": value["prompt"]},)
    else:
        raise RecordError(MISSING_FIELD, "'prompt' or 'messages'")
    if prompt[-1]["role"] != "user":
        raise RecordError(PROMPT_NOT_ENDING_WITH_USER, f"the last message is the {prompt[-1]['role']}'s")
    _check_user_first(prompt)
    answers = []
    for key in ("chosen", "rejected"):
        if key not in value:
            raise RecordError(MISSING_FIELD, f"{key!r}")
        if not isinstance(value[key], str):
            raise RecordError(WRONG_TYPE, f"{key!r} is a {_type_name(value[key])}, expected a string")
        if not value[key].strip():
            raise RecordError(EMPTY_ASSISTANT, f"{key!r} is empty")
        answers.append(value[key])
    # Identical answers give a DPO/reward gradient of exactly zero: nothing to learn, and
    # usually a data bug.
    if answers[0].strip() == answers[1].strip():
        raise RecordError(IDENTICAL_PAIR)
    margin = value.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise RecordError(WRONG_TYPE, f"'margin' is {margin!r}, expected a finite number")
        margin = float(margin)
    preference = value.get("preference")
    if preference is not None and preference not in PREFERENCE_LEVELS:
        raise RecordError(UNKNOWN_PREFERENCE, f"{preference!r}; expected one of {', '.join(PREFERENCE_LEVELS)}")
    edited = value.get("edited")
    if edited is not None:
        if not isinstance(edited, str):
            raise RecordError(WRONG_TYPE, f"'edited' is a {_type_name(edited)}, expected a string")
        if not edited.strip():
            raise RecordError(EMPTY_ASSISTANT, "'edited' is empty")
        if edited.strip() in (answers[0].strip(), answers[1].strip()):
            raise RecordError(IDENTICAL_PAIR, "'edited' equals 'chosen' or 'rejected'")
    return PreferencePair(prompt, answers[0], answers[1], margin, preference, edited=edited)


def read_sft_records(paths: Iterable[str | Path],
                     summary: DataSummary | None = None) -> tuple[list[SFTRecord], DataSummary]:
    """Every valid SFT conversation in the JSONL files ``paths``, and the summary (bad records set aside)."""
    summary = summary if summary is not None else DataSummary()
    out = []
    for name, lineno, value in _iter_json_lines(paths, summary):
        try:
            out.append(SFTRecord(parse_sft_record(value), name, lineno))
        except RecordError as e:
            summary.add(name, lineno, e.reason, e.detail)
    return out, summary


def read_preference_records(paths: Iterable[str | Path],
                            summary: DataSummary | None = None) -> tuple[list[PreferencePair], DataSummary]:
    """Every valid preference pair in the JSONL files ``paths``, and the summary (bad records set aside)."""
    summary = summary if summary is not None else DataSummary()
    out = []
    for name, lineno, value in _iter_json_lines(paths, summary):
        try:
            pair = parse_preference_record(value)
        except RecordError as e:
            summary.add(name, lineno, e.reason, e.detail)
            continue
        out.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected, pair.margin, pair.preference,
                                  name, lineno, pair.edited))
    return out, summary


# --------------------------------------------------------------------------------------------
# Rendering with the model's chat format, and the masks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedChat:
    """One rendered conversation.

    ``assistant_spans`` are ``[start, end)`` token ranges of each assistant turn: its content and the
    end-of-turn token(s) that close it (what generation must produce to stop), nothing after.
    ``loss_mask[k]``: token k is a training target under the chosen ``train_on``. ``formatting[k]``:
    token k is not part of any message's content (chat-format specials, headers, template text).
    """

    tokens: list[int]
    loss_mask: list[bool]
    formatting: list[bool]
    assistant_spans: list[tuple[int, int]]


def _render(tokenizer: Any, messages: Sequence[Message], fmt: str, *, add_generation_prompt: bool) -> list[int]:
    """``encode_chat`` (chat.py's renderer: what is trained is what is served), errors as records'."""
    try:
        return encode_chat(tokenizer, list(messages), fmt=fmt, add_generation_prompt=add_generation_prompt)
    except (ValueError, jinja2.TemplateError) as e:
        raise RecordError(FORMAT_REJECTS, str(e)) from None


def _check_prefix(tokenizer: Any, short: list[int], long: list[int], what: str) -> None:
    """Raise PREFIX_BROKEN unless ``short`` is a prefix of ``long``, showing the first difference."""
    if long[:len(short)] == short:
        return
    k = next((i for i, (a, b) in enumerate(zip(short, long)) if a != b), min(len(short), len(long)))
    raise RecordError(PREFIX_BROKEN, f"{what}: ids differ from position {k}: "
                      f"{tokenizer.decode(short[k:k + 4])!r} vs {tokenizer.decode(long[k:k + 4])!r}")


def _formatting_mask(tokenizer: Any, messages: Sequence[Message], fmt: str, full: list[int]) -> list[bool]:
    """True for the tokens of ``full`` that belong to no message's content.

    Each message's content is located by rendering the conversation again with that message's
    content emptied: the ids both renderings share at the start and at the end are not that
    content, the ones in between are. This needs no knowledge of the format (it finds Llama 3's
    headers, ChatML's ``<|im_start|>role\\n``, Llama 2's ``[INST]``/``<<SYS>>``, and text a template
    adds, such as SmolLM2's default system prompt, alike). Where a token merges content with
    format text it counts as content, so formatting is never over-reported. If a template refuses
    an empty message, the fallback is the tokenizer's special ids.
    """
    content = [False] * len(full)
    for j, m in enumerate(messages):
        if not m["content"]:
            continue
        probe = [*messages[:j], {"role": m["role"], "content": ""}, *messages[j + 1:]]
        try:
            other = _render(tokenizer, probe, fmt, add_generation_prompt=False)
        except RecordError:
            special = set(tokenizer.special_tokens.values()) | {tokenizer.bos_id, tokenizer.eos_id}
            return [i in special for i in full]
        n = min(len(full), len(other))
        p = 0
        while p < n and full[p] == other[p]:
            p += 1
        s = 0
        while s < n - p and full[-1 - s] == other[-1 - s]:
            s += 1
        for k in range(p, len(full) - s):
            content[k] = True
    return [not c for c in content]


def encode_conversation(tokenizer: Any, messages: Sequence[Message], *, fmt: str | None = None,
                        train_on: TrainOn = "assistant") -> EncodedChat:
    """Render a conversation ending with an assistant turn, with its loss and formatting masks.

    ``train_on``: ``"assistant"`` puts loss on every assistant turn (Llama 2 §3.1: "we zero-out
    the loss on tokens from the user prompt"), ``"last"`` on the final one only, ``"all"`` on every
    token. ``fmt`` defaults to the tokenizer's own format (`chat_format`).

    Raises `RecordError` (reason in `REASONS`) when the format rejects the conversation or when a
    rendering is not a prefix of the next (the assistant spans could not be trusted).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    fmt = fmt or chat_format(tokenizer)
    messages = list(messages)
    if not messages or messages[-1]["role"] != "assistant":
        raise RecordError(NOT_ENDING_WITH_ASSISTANT)
    _check_user_first(messages)
    full = _render(tokenizer, messages, fmt, add_generation_prompt=False)
    stops = chat_stop_ids(tokenizer, fmt)
    spans: list[tuple[int, int]] = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j], fmt, add_generation_prompt=True)
        through = full if j == len(messages) - 1 else _render(tokenizer, messages[:j + 1], fmt,
                                                              add_generation_prompt=False)
        _check_prefix(tokenizer, before, through, f"message {j} (assistant) against the prompt before it")
        _check_prefix(tokenizer, through, full, f"the conversation through message {j} against the whole")
        start, end = len(before), len(through)
        # End the span at the token that closes the turn (ChatML's <|im_end|>, Llama 3's
        # <|eot_id|>, Llama 2's EOS): generation stops there, so what a template writes after it
        # (ChatML's "\n") is never produced by the model and is not trained on.
        closers = [k for k in range(start, end) if full[k] in stops]
        if closers:
            end = closers[-1] + 1
        if end <= start:
            raise RecordError(NO_LOSS_TOKENS, f"message {j} (assistant) renders to no tokens")
        spans.append((start, end))
    mask = [False] * len(full)
    if train_on == "all":
        mask = [True] * len(full)
    else:
        for start, end in spans if train_on == "assistant" else spans[-1:]:
            mask[start:end] = [True] * (end - start)
    # Token 0 has nothing before it to predict it from: never a target.
    mask[0] = False
    return EncodedChat(full, mask, _formatting_mask(tokenizer, messages, fmt, full), spans)


def encode_preference(tokenizer: Any, prompt: Sequence[Message], chosen: str, rejected: str, *,
                      fmt: str | None = None) -> tuple[EncodedChat, EncodedChat]:
    """Prompt + chosen and prompt + rejected, each with loss on its response only (content and the
    end-of-turn token); both share the prompt's ids, which is checked."""
    c = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": chosen}], fmt=fmt, train_on="last")
    r = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": rejected}], fmt=fmt,
                            train_on="last")
    start = c.assistant_spans[-1][0]
    if r.assistant_spans[-1][0] != start or c.tokens[:start] != r.tokens[:start]:
        raise RecordError(PREFIX_BROKEN, "chosen and rejected renderings do not share the prompt's ids")
    return c, r


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # arrays: compare fields with numpy, not ==
class Sample:
    """One tokenised conversation: int32 ``tokens``, bool ``loss_mask`` and ``formatting`` (see
    `EncodedChat`), and where it came from."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    formatting: np.ndarray
    file: str = ""
    line: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_encoded(cls, enc: EncodedChat, file: str = "", line: int = 0) -> Sample:
        """Arrays from an `EncodedChat`."""
        return cls(np.asarray(enc.tokens, dtype=np.int32), np.asarray(enc.loss_mask, dtype=bool),
                   np.asarray(enc.formatting, dtype=bool), file, line)


@dataclass(frozen=True, eq=False)
class PreferenceSample:
    """A tokenised preference pair; ``prompt_len`` ids are shared by ``chosen`` and ``rejected``."""

    chosen: Sample
    rejected: Sample
    prompt_len: int
    margin: float | None = None
    preference: str | None = None
    file: str = ""
    line: int = 0
    edited: Sample | None = None  # reward models rank edited > chosen > rejected; DPO does not use it


def _fits(n: int, max_len: int | None) -> None:
    if max_len is not None and n > max_len:
        raise RecordError(OVER_LONG, f"{n} tokens > {max_len}")


def tokenize_sft(records: Iterable[SFTRecord], tokenizer: Any, summary: DataSummary, *, fmt: str | None = None,
                 train_on: TrainOn = "assistant", max_len: int | None = None) -> list[Sample]:
    """Samples for ``records``; those that fail to render or exceed ``max_len`` tokens go to ``summary``.

    Over-long samples are set aside rather than truncated: a cut conversation would train the model
    on an answer that stops mid-way without its end-of-turn token.
    """
    fmt = fmt or chat_format(tokenizer)
    out = []
    for rec in records:
        try:
            enc = encode_conversation(tokenizer, rec.messages, fmt=fmt, train_on=train_on)
            _fits(len(enc.tokens), max_len)
        except RecordError as e:
            summary.add(rec.file, rec.line, e.reason, e.detail)
            continue
        sample = Sample.from_encoded(enc, rec.file, rec.line)
        summary.tokens += len(sample)
        summary.loss_tokens += int(sample.loss_mask.sum())
        out.append(sample)
    return out


def tokenize_preferences(pairs: Iterable[PreferencePair], tokenizer: Any, summary: DataSummary, *,
                         fmt: str | None = None, max_len: int | None = None) -> list[PreferenceSample]:
    """Tokenised pairs; a pair whose chosen or rejected side fails or exceeds ``max_len`` goes to ``summary``."""
    fmt = fmt or chat_format(tokenizer)
    out = []
    for p in pairs:
        try:
            c, r = encode_preference(tokenizer, p.prompt, p.chosen, p.rejected, fmt=fmt)
            e = encode_preference(tokenizer, p.prompt, p.edited, p.rejected, fmt=fmt)[0] if p.edited else None
            _fits(max(len(c.tokens), len(r.tokens), len(e.tokens) if e else 0), max_len)
        except RecordError as err:
            summary.add(p.file, p.line, err.reason, err.detail)
            continue
        sample = PreferenceSample(Sample.from_encoded(c, p.file, p.line), Sample.from_encoded(r, p.file, p.line),
                                  c.assistant_spans[-1][0], p.margin, p.preference, p.file, p.line,
                                  Sample.from_encoded(e, p.file, p.line) if e else None)
        sides = [sample.chosen, sample.rejected] + ([sample.edited] if sample.edited is not None else [])
        summary.tokens += sum(len(x) for x in sides)
        summary.loss_tokens += int(sum(x.loss_mask.sum() for x in sides))
        out.append(sample)
    return out


def load_sft_samples(paths: Iterable[str | Path], tokenizer: Any, *, fmt: str | None = None,
                     train_on: TrainOn = "assistant", max_len: int | None = None) -> tuple[list[Sample], DataSummary]:
    """Read and tokenise SFT JSONL files: the samples and one summary of both steps."""
    records, summary = read_sft_records(paths)
    return tokenize_sft(records, tokenizer, summary, fmt=fmt, train_on=train_on, max_len=max_len), summary


def load_preference_samples(paths: Iterable[str | Path], tokenizer: Any, *, fmt: str | None = None,
                            max_len: int | None = None) -> tuple[list[PreferenceSample], DataSummary]:
    """Read and tokenise preference JSONL files: the pairs and one summary of both steps."""
    pairs, summary = read_preference_records(paths)
    return tokenize_preferences(pairs, tokenizer, summary, fmt=fmt, max_len=max_len), summary


def mix_sources(parts: Sequence[tuple[str, Sequence[Any], float | None, float | None]],
                seed: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """A fine-tuning mixture: ``parts`` = [(name, items, fraction, share)], each with either
    ``fraction`` (take round(fraction * len(items)) of its items) or ``share`` (take that share of
    the whole mixture, whose size is what the fraction parts give / (1 - the shares)). Items are
    drawn without repeats (seeded, per part) while there are enough, whole copies first beyond
    that; a part taken whole keeps its order. Returns the items and per part
    ``{"name", "available", "taken"}``. ValueError when a part to sample from is empty."""
    base = sum(round(fr * len(items)) for _, items, fr, _ in parts if fr is not None)
    shares = sum(sh for _, _, _, sh in parts if sh is not None)
    total = base / (1 - shares) if shares < 1 else float(base)
    out: list[Any] = []
    report = []
    for k, (name, items, fr, sh) in enumerate(parts):
        n = round(fr * len(items)) if fr is not None else round(sh * total)
        if n and not items:
            raise ValueError(f"{name}: no usable records to take {n} from")
        if n == len(items):
            pick = np.arange(n)
        else:
            rng = np.random.default_rng([seed, k])
            whole, rest = divmod(n, len(items)) if items else (0, 0)
            pick = np.concatenate([np.tile(np.arange(len(items)), whole),
                                   np.sort(rng.choice(len(items), rest, replace=False))]).astype(int)
        out += [items[i] for i in pick]
        report.append({"name": name, "available": len(items), "taken": int(n)})
    return out, report


# --------------------------------------------------------------------------------------------
# Rows: packing, and one sample per row
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Row:
    """One sequence of real tokens (no padding yet), built from one or more samples.

    ``labels[t]``: the target for slot t (``tokens[t+1]`` if it carries loss and is in the same
    sample, else -100). ``doc_ids[t]``: index of t's sample within the row. ``positions[t]``: t's
    position within its sample (restarts at 0). ``label_formatting[t]``: the target ``tokens[t+1]``
    is a formatting token. ``samples``: indices of the samples in the list the row was built from.
    """

    tokens: np.ndarray
    labels: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    label_formatting: np.ndarray
    samples: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)


def _row(samples: Sequence[Sample], indices: Sequence[int]) -> Row:
    parts = [samples[i] for i in indices]
    labels, label_fmt = [], []
    for s in parts:
        # Shift within the sample only, so the last token of one sample never gets the next
        # sample's first token as its target.
        lab = np.full(len(s), IGNORE_INDEX, dtype=np.int64)
        lab[:-1] = np.where(s.loss_mask[1:], s.tokens[1:], IGNORE_INDEX)
        fm = np.zeros(len(s), dtype=bool)
        fm[:-1] = s.formatting[1:]
        labels.append(lab)
        label_fmt.append(fm)
    return Row(tokens=np.concatenate([s.tokens for s in parts]).astype(np.int64),
               labels=np.concatenate(labels),
               doc_ids=np.concatenate([np.full(len(s), k, dtype=np.int64) for k, s in enumerate(parts)]),
               positions=np.concatenate([np.arange(len(s), dtype=np.int64) for s in parts]),
               label_formatting=np.concatenate(label_fmt),
               samples=tuple(indices))


def sample_rows(samples: Sequence[Sample]) -> list[Row]:
    """One row per sample (no packing), in order; `collate` pads them."""
    return [_row(samples, [i]) for i in range(len(samples))]


def pack(samples: Sequence[Sample], seq_len: int, *,
         method: Literal["first_fit", "in_order"] = "first_fit") -> list[Row]:
    """Pack samples into rows of at most ``seq_len`` tokens; no sample is split.

    ``"first_fit"`` (default): each sample, in the given order, goes into the first row that
    still has room, else opens a new one. Taking samples in the caller's (shuffled) order rather
    than sorted by length (first-fit *decreasing*) keeps every row a random mix of lengths instead
    of grouping the longest samples into the first rows, and first-fit still fills rows well:
    short samples backfill earlier rows. Found in O(log rows) per sample with a max-tree over the
    rows' free space. ``"in_order"`` (next-fit): samples stay in order and a row is closed as soon
    as the next sample does not fit; use it where order matters (a curriculum, a stream). Rows
    come out in the order they were opened. Raises ValueError for a sample longer than ``seq_len``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    lengths = [len(s) for s in samples]
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"sample {i} ({samples[i].file}:{samples[i].line}) has {n} tokens > seq_len={seq_len}; "
                             f"tokenise with max_len=seq_len to set such samples aside")
    bins: list[list[int]] = []
    if method == "in_order":
        free = 0
        for i, n in enumerate(lengths):
            if not bins or n > free:
                bins.append([])
                free = seq_len
            bins[-1].append(i)
            free -= n
    elif method == "first_fit":
        # Leaves: free space of row r (rows not yet opened have seq_len free, and since they lie
        # to the right of every opened row, "leftmost leaf with room" opens them in order).
        size = 1
        while size < max(len(lengths), 1):
            size *= 2
        tree = [seq_len] * (2 * size)
        for i, n in enumerate(lengths):
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= n else 2 * node + 1
            r = node - size
            if r == len(bins):
                bins.append([])
            bins[r].append(i)
            tree[node] -= n
            node //= 2
            while node:
                tree[node] = max(tree[2 * node], tree[2 * node + 1])
                node //= 2
    else:
        raise ValueError(f"method must be 'first_fit' or 'in_order', got {method!r}")
    return [_row(samples, b) for b in bins]


def pad_id_for(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad, else its eos, else 0. Which id it is never matters:
    padding carries no loss and no real token attends to it."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return int(i)
    return 0


def packing_efficiency(rows: Sequence[Row], seq_len: int) -> float:
    """Real tokens / slots when ``rows`` are padded to ``seq_len``: the share of compute not spent on padding."""
    return sum(len(r) for r in rows) / (len(rows) * seq_len) if rows else 0.0


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Rows padded into (B, S) tensors, ready for ``model(tokens, input_pos=input_pos, doc_ids=doc_ids)``.

    Padding: ``pad_id`` tokens with label -100, their own document id (one past the row's last, so
    no real token attends to them and they attend only among themselves; no query row is ever
    fully masked) and positions counting from 0. ``n_real`` real tokens out of ``n_slots``.
    """

    tokens: Tensor
    labels: Tensor
    doc_ids: Tensor
    input_pos: Tensor
    label_formatting: Tensor
    n_real: int
    n_slots: int

    @property
    def efficiency(self) -> float:
        """Real tokens / slots of this batch."""
        return self.n_real / self.n_slots if self.n_slots else 0.0

    @property
    def n_loss_tokens(self) -> int:
        """Targets that carry loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def collate(rows: Sequence[Row], *, pad_id: int, pad_to: int | None = None) -> Batch:
    """Stack rows into a `Batch`, right-padded to ``pad_to`` (e.g. seq_len) or to the longest row."""
    if not rows:
        raise ValueError("collate: no rows")
    width = max(len(r) for r in rows) if pad_to is None else pad_to
    if any(len(r) > width for r in rows):
        raise ValueError(f"collate: a row of {max(len(r) for r in rows)} tokens does not fit pad_to={width}")
    shape = (len(rows), width)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    label_fmt = np.zeros(shape, dtype=bool)
    for b, r in enumerate(rows):
        n = len(r)
        tokens[b, :n], labels[b, :n], label_fmt[b, :n] = r.tokens, r.labels, r.label_formatting
        doc_ids[b, :n], positions[b, :n] = r.doc_ids, r.positions
        doc_ids[b, n:] = int(r.doc_ids.max()) + 1 if n else 0
        positions[b, n:] = np.arange(width - n)
    n_real = sum(len(r) for r in rows)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(doc_ids),
                 torch.from_numpy(positions), torch.from_numpy(label_fmt), n_real, len(rows) * width)


@dataclass
class PreferenceBatch:
    """Chosen and rejected sides of B pairs, padded to one width (so they can run as one 2B batch),
    with ``margin`` (B,) float (NaN where a pair has none) and the ``preference`` labels."""

    chosen: Batch
    rejected: Batch
    margin: Tensor
    preference: list[str | None]


def collate_preferences(pairs: Sequence[PreferenceSample], *, pad_id: int,
                        pad_to: int | None = None) -> PreferenceBatch:
    """Batch preference pairs, one sample per row. The response-only loss labels are ``labels``;
    Llama 3's DPO additionally drops formatting targets: ``labels.masked_fill(label_formatting, -100)``."""
    if not pairs:
        raise ValueError("collate_preferences: no pairs")
    chosen = sample_rows([p.chosen for p in pairs])
    rejected = sample_rows([p.rejected for p in pairs])
    width = pad_to if pad_to is not None else max(len(r) for r in [*chosen, *rejected])
    margin = torch.tensor([math.nan if p.margin is None else p.margin for p in pairs], dtype=torch.float32)
    return PreferenceBatch(collate(chosen, pad_id=pad_id, pad_to=width), collate(rejected, pad_id=pad_id, pad_to=width),
                           margin, [p.preference for p in pairs])


@dataclass
class SharedPromptBatch:
    """B preference pairs (or groups of answers to one prompt), one row each: the tokens all the
    sides of a pair start with (the rendered prompt) once, then the rest of each side in turn.

    ``mask`` (B, 1, W, W): causal, except that a side's rest sees no other side's rest, so each
    side's tokens see exactly what they see in a row of their own; ``input_pos``: every rest
    continues from the shared part's length. A side's log-probs come from the hidden states at
    ``index`` (N, L; flat into the (B * W) slots): the slots that predict its labelled targets
    ``targets`` (N, L; -100 where a side has fewer); ``last`` (N,): the slot of its last token (a
    reward model's score). The N sides are ordered as given: every pair's first side, then every
    pair's second, ... (a pair without one skipped). The shared part's slots serve every side (its
    last one predicts each first response token), so the figures equal those of separate rows, at
    the cost of the shared tokens once instead of once a side (``shared``: tokens saved).
    """

    tokens: Tensor
    input_pos: Tensor
    mask: Tensor
    index: Tensor
    targets: Tensor
    last: Tensor
    n_real: int
    n_slots: int
    shared: int


def shared_prefix(rows: Sequence[Row | Sample]) -> int:
    """How many first tokens all of ``rows`` have in common."""
    n = min(len(r) for r in rows)
    same = np.all([r.tokens[:n] == rows[0].tokens[:n] for r in rows[1:]], axis=0) if len(rows) > 1 else np.ones(n, bool)
    differ = np.flatnonzero(~same)
    return int(differ[0]) if len(differ) else n


def share_prompts(*sides: Sequence[Row | None], pad_id: int, mask_formatting: bool = False) -> SharedPromptBatch:
    """Pack each pair's rows (from :func:`sample_rows`; ``sides[j][b]`` is pair b's j-th side, e.g.
    ``share_prompts(chosen, rejected)``, or None where pair b has no j-th side) into one row sharing
    their common first tokens (see :class:`SharedPromptBatch`); ``mask_formatting``: targets that are
    formatting tokens carry no log-prob (Llama 3's DPO), as ``labels.masked_fill(label_formatting, -100)``."""
    if len(sides) < 2 or not sides[0] or any(len(side) != len(sides[0]) for side in sides):
        raise ValueError(f"share_prompts: expected two or more sides of one length, got {[len(x) for x in sides]}")
    if any(r is None for r in sides[0]) or any(r is None for r in sides[1]):
        raise ValueError("share_prompts: every pair needs its first two sides")
    rows, placed, shared = [], [[] for _ in sides], 0  # placed[j]: (pair, slots of its tokens) per side
    for b in range(len(sides[0])):
        group = [(j, side[b]) for j, side in enumerate(sides) if side[b] is not None]
        p = shared_prefix([r for _, r in group])
        tokens, positions, segments = [group[0][1].tokens[:p]], [np.arange(p)], []
        at = p
        for j, r in group:
            rest = len(r) - p
            tokens.append(r.tokens[p:])
            positions.append(np.arange(p, len(r)))
            segments.append((at, at + rest))
            placed[j].append((b, np.concatenate([np.arange(p), np.arange(at, at + rest)]), r))
            at += rest
        rows.append((np.concatenate(tokens), np.concatenate(positions), segments))
        shared += p * (len(group) - 1)
    width = max(len(t) for t, _, _ in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.tril(np.ones((len(rows), 1, width, width), dtype=bool))
    for b, (t, pos, segments) in enumerate(rows):
        n = len(t)
        tokens[b, :n], positions[b, :n] = t, pos
        positions[b, n:] = np.arange(width - n)
        for i, (s0, s1) in enumerate(segments):  # a rest sees no earlier side's rest
            for e0, e1 in segments[:i]:
                mask[b, 0, s0:s1, e0:e1] = False
    ordered = [x for side in placed for x in side]
    picks = []
    for b, slot, r in ordered:
        labels = np.where(r.label_formatting, IGNORE_INDEX, r.labels) if mask_formatting else r.labels
        keep = labels != IGNORE_INDEX
        picks.append((b * width + slot[keep], labels[keep]))
    length = max(1, max(len(s) for s, _ in picks))
    index = np.zeros((len(picks), length), dtype=np.int64)
    targets = np.full((len(picks), length), IGNORE_INDEX, dtype=np.int64)
    for i, (slot, lab) in enumerate(picks):
        index[i, : len(slot)] = slot
        targets[i, : len(lab)] = lab
    last = np.array([b * width + slot[-1] for b, slot, _ in ordered], dtype=np.int64)
    n_real = sum(len(t) for t, _, _ in rows)
    return SharedPromptBatch(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(mask),
                             torch.from_numpy(index), torch.from_numpy(targets), torch.from_numpy(last), n_real,
                             len(rows) * width, shared)
