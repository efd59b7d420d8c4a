"""LLaMA 1/2 tokenizers: SentencePiece BPE `tokenizer.model` files, run by the sentencepiece library."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .base import TokenizerError, collect_stop_ids

__all__ = ["SentencePieceTokenizer"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceTokenizer:
    """A SentencePiece model file (LLaMA 1/2's `tokenizer.model`) behind the `Tokenizer` protocol.

    Plain text is encoded exactly as `SentencePieceProcessor.encode` does. With
    `allow_special=True` the text is first cut at control-token strings (`<s>`, `</s>`, ...),
    and every piece of text between them is encoded on its own, dummy prefix included. That is
    what Meta's reference code (which encodes each segment separately and inserts the control
    ids) and llama.cpp (which re-adds the space prefix after every special token) produce; HF's
    non-legacy LlamaTokenizer would instead omit the '▁' after a special token.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Load `path`; raise TokenizerError if it is not a SentencePiece model."""
        import sentencepiece as spm

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{self.path}: no such file; expected a SentencePiece tokenizer.model")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model file ({e})") from None
        n = self._sp.vocab_size()
        if n <= 0:
            raise TokenizerError(f"{self.path}: SentencePiece model has an empty vocabulary")

        def opt(i: int) -> int | None:
            return i if i >= 0 else None

        self.bos_id: int | None = opt(self._sp.bos_id())
        self.eos_id: int | None = opt(self._sp.eos_id())
        self.pad_id: int | None = opt(self._sp.pad_id())
        self.unk_id: int | None = opt(self._sp.unk_id())
        self.special_tokens: dict[str, int] = {
            self._sp.id_to_piece(i): i for i in range(n) if self._sp.is_control(i)
        }
        self._control = frozenset(self.special_tokens.values())
        self.stop_ids: frozenset[int] = collect_stop_ids(self.eos_id, self.special_tokens)
        self.chat_template: str | None = None  # a .model file carries no chat template
        self.name: str = f"sentencepiece:{self.path}"
        self.add_bos_default: bool = True  # LLaMA prepends <s> to every prompt
        # Longest first so that a special token that is a prefix of another never wins.
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._bytes = [self._piece_bytes(i) for i in range(n)]

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return int(self._sp.vocab_size())

    def _piece_bytes(self, i: int) -> bytes:
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        if self._sp.is_control(i):
            return piece.encode("utf-8")
        if self._sp.is_unknown(i):
            # What SentencePiece's own decoder prints for <unk> (LLaMA: " \u2047 ").
            return self._sp.decode([i]).encode("utf-8") or piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; see the class docstring for how `allow_special` splits it."""
        ids: list[int] = []
        if bos:
            ids.append(self._require(self.bos_id, "bos"))
        if allow_special and self._special_re is not None:
            pos = 0
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    ids.extend(self._sp.encode(text[pos : m.start()]))
                ids.append(self.special_tokens[m.group()])
                pos = m.end()
            if pos < len(text):
                ids.extend(self._sp.encode(text[pos:]))
        else:
            ids.extend(self._sp.encode(text))
        if eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids`. Control tokens appear as their text (SentencePiece alone would drop them);
        each run of ordinary ids between them is decoded by SentencePiece, which removes the dummy
        prefix space, so this inverts `encode(..., allow_special=True)`."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._bytes):
                raise TokenizerError(f"{self.path}: token id {i} is outside the vocabulary (0..{len(self._bytes) - 1})")
            if i in self._control:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one piece: '▁' becomes a space, `<0xNN>` the byte NN, control pieces their text."""
        if not 0 <= id < len(self._bytes):
            raise TokenizerError(f"{self.path}: token id {id} is outside the vocabulary (0..{len(self._bytes) - 1})")
        return self._bytes[id]

    def _require(self, value: int | None, what: str) -> int:
        if value is None:
            raise TokenizerError(f"{self.path}: the model has no {what} token")
        return value

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"
