"""The interface every tokenizer in llamalab satisfies, and the error they raise."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Tokenizer", "TokenizerError", "STOP_TOKEN_TEXTS", "collect_stop_ids"]


class TokenizerError(ValueError):
    """A tokenizer file or metadata block is missing, malformed, or of an unexpected kind.

    The message always names the file (or metadata source) and what was expected there, so a
    user pointing the CLI at the wrong path can tell what went wrong without a traceback.
    """


# Texts of control tokens that end an assistant turn in the chat formats we know. A model that
# emits any of them is done; llama.cpp treats the same set as "end of generation" tokens.
STOP_TOKEN_TEXTS: frozenset[str] = frozenset(
    {
        "<|end_of_text|>",  # Llama 3 eos
        "<|eot_id|>",  # Llama 3 end of turn
        "<|eom_id|>",  # Llama 3.1 end of message (tool call pending)
        "<|im_end|>",  # ChatML (SmolLM2, Qwen)
        "<|endoftext|>",  # GPT-2 style eos, SmolLM2's document separator
        "<|end|>",  # Phi-3
        "<end_of_turn>",  # Gemma
    }
)


def collect_stop_ids(eos_id: int | None, special_tokens: Mapping[str, int], extra: Iterable[int] = ()) -> frozenset[int]:
    """The eos id, the special tokens whose text marks the end of a turn, and `extra` ids."""
    ids = {i for name, i in special_tokens.items() if name in STOP_TOKEN_TEXTS}
    ids.update(int(i) for i in extra)
    if eos_id is not None:
        ids.add(eos_id)
    return frozenset(ids)


def describe(path: str | os.PathLike[str]) -> str:
    """A path as it should appear in error messages."""
    return os.fspath(path)


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids, plus what generation and chat formatting need to know about the vocab.

    Attributes:
        bos_id, eos_id, pad_id: ids of those tokens, or None where the vocabulary has none.
        special_tokens: text -> id of every control/special token.
        stop_ids: ids that end generation (eos, and turn-ending tokens such as `<|eot_id|>`).
        chat_template: the Jinja chat template carried by the source, or None.
        name: a short identity such as "sentencepiece:/path/tokenizer.model".
        add_bos_default: whether the source asks for bos to be prepended to a prompt. `encode`
            never adds it on its own; callers pass `bos=add_bos_default`.
    """

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: dict[str, int]
    stop_ids: frozenset[int]
    chat_template: str | None
    name: str
    add_bos_default: bool

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`.

        bos/eos: prepend/append those ids. allow_special: whether special-token strings in the
        text (e.g. `<|eot_id|>`) become their ids; when False they are encoded as plain text,
        which is what untrusted user input needs.
        """
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`; special tokens are rendered as their text, bad UTF-8 as U+FFFD."""
        ...

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` stands for (a space for SentencePiece's '▁', text for specials).

        Concatenating these and decoding UTF-8 incrementally lets a streamer print text without
        cutting multi-byte characters; SentencePiece's dummy-prefix space is *not* removed here.
        """
        ...
