"""Chat: turning a conversation into prompt ids, and the tokens that end an answer.

Three formats, chosen from what the tokenizer carries:

- ``template``: the Jinja chat template an HF or GGUF checkpoint ships (SmolLM2's is ChatML),
  rendered as transformers renders it, then encoded with special tokens allowed.
- ``llama3``: Meta's Llama 3 format, ``<|start_header_id|>role<|end_header_id|>\\n\\n`` +
  content + ``<|eot_id|>`` per message, built from ids so that message text is never parsed
  as special tokens.
- ``llama2``: Meta's Llama 2 chat format, ``[INST] ... [/INST]`` with the system prompt inside
  ``<<SYS>>`` in the first user turn; each exchange is encoded on its own between BOS and EOS,
  as Meta's ``chat_completion`` does.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, str]
FORMATS = ("template", "llama3", "llama2")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA3_HEADER = ("<|start_header_id|>", "<|end_header_id|>")
LLAMA3_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def render_chat_template(template: str, messages: list[Message], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}]) with a HF/GGUF chat template.

    Like transformers: a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, and the
    ``raise_exception`` helper templates call to reject bad conversations. ``variables`` carries
    ``bos_token`` / ``eos_token`` and any other names the template uses.
    """
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """``template`` compiled once: compiling costs ~4.6 ms against ~0.06 ms to render (SmolLM2's
    template), and fine-tuning data renders each conversation several times."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def chat_format(tokenizer: Any) -> str:
    """The chat format a tokenizer implies: its own template, else Llama 3's header tokens, else Llama 2's."""
    if getattr(tokenizer, "chat_template", None):
        return "template"
    if all(t in tokenizer.special_tokens for t in LLAMA3_HEADER):
        return "llama3"
    return "llama2"


def chat_stop_ids(tokenizer: Any, fmt: str | None = None) -> frozenset[int]:
    """The ids that end an assistant turn in ``fmt`` (default: the tokenizer's format).

    Llama 3 ends a turn with ``<|eot_id|>`` (``<|eom_id|>`` after a tool call) and text with
    ``<|end_of_text|>``; Llama 2 with EOS; a template's model with the tokenizer's stop ids.
    """
    fmt = fmt or chat_format(tokenizer)
    stops = set(tokenizer.stop_ids)
    if fmt == "llama3":
        stops |= {tokenizer.special_tokens[t] for t in LLAMA3_STOPS if t in tokenizer.special_tokens}
    elif tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    return frozenset(stops)


def _check_roles(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("chat: the conversation is empty (expected at least one user message)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat: message {i} must be {{'role': ..., 'content': ...}}, got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"chat: message {i} has role {m['role']!r}; expected system, user or assistant")


def _encode_llama2(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("chat (llama2): a system prompt must be followed by a user message")
        first = messages[1]
        messages = [{"role": first["role"], "content": B_SYS + messages[0]["content"] + E_SYS + first["content"]},
                    *messages[2:]]
    roles = [m["role"] for m in messages]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ValueError("chat (llama2): roles must alternate user/assistant/user/..., after an optional system")
    # A prompt ends on the user's turn (Meta's chat_completion); a conversation to train on
    # (add_generation_prompt=False) may end on the assistant's: each exchange is its own BOS ... EOS.
    if roles[-1] != "user" and add_generation_prompt:
        raise ValueError("chat (llama2): the last message must be the user's")
    ids: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        ids += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    if roles[-1] == "user":
        ids += tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def _encode_llama3(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    sp = tokenizer.special_tokens
    start, end = sp[LLAMA3_HEADER[0]], sp[LLAMA3_HEADER[1]]

    def header(role: str) -> list[int]:
        return [start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n")]

    ids = [sp["<|begin_of_text|>"]]
    for m in messages:
        ids += header(m["role"]) + tokenizer.encode(m["content"].strip()) + [sp["<|eot_id|>"]]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def encode_chat(tokenizer: Any, messages: list[Message], *, fmt: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """The prompt ids for ``messages`` in ``fmt`` (default: :func:`chat_format` of the tokenizer).

    Raises ValueError for a malformed conversation (and jinja2.TemplateError when a
    template rejects it).
    """
    fmt = fmt or chat_format(tokenizer)
    if fmt not in FORMATS:
        raise ValueError(f"chat: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _check_roles(messages)
    if fmt == "llama2":
        return _encode_llama2(tokenizer, messages, add_generation_prompt)
    if fmt == "llama3":
        return _encode_llama3(tokenizer, messages, add_generation_prompt)
    if not tokenizer.chat_template:
        raise ValueError(f"chat: {tokenizer.name} carries no chat template; use fmt='llama2' or 'llama3'")
    special = {name: tokenizer.decode([i]) for name, i in (("bos_token", tokenizer.bos_id),
                                                            ("eos_token", tokenizer.eos_id)) if i is not None}
    text = render_chat_template(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                **special)
    return tokenizer.encode(text, allow_special=True)
