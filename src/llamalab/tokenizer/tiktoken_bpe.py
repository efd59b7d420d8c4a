"""Llama 3 tokenizers: a tiktoken-format `tokenizer.model` (base64 token + rank per line)."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterator, Sequence

from .base import TokenizerError, collect_stop_ids

__all__ = [
    "LLAMA3_PAT_STR",
    "LLAMA3_SPECIAL_TOKENS",
    "TiktokenTokenizer",
    "looks_like_tiktoken",
    "read_tiktoken_ranks",
]

# Llama 3's pre-tokenizer split, as in Meta's reference tokenizer.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NUM_SPECIAL = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
# Llama 3.1's 256 special tokens in id order; they follow the mergeable ranks (ids 128000.. for
# the real 128000-rank file).
LLAMA3_SPECIAL_TOKENS: list[str] = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _NUM_SPECIAL - len(_NAMED_SPECIALS))
]

# Meta's limits: tiktoken's matcher is super-linear on very long runs of whitespace or of
# non-whitespace, so text is cut into chunks before encoding.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+\r?$")
_RUN = re.compile(r"\s+|\S+")


def looks_like_tiktoken(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with a `base64 rank` line (a SentencePiece model is binary protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0]
    return bool(_TIKTOKEN_LINE.match(first))


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken BPE file into {token bytes: rank}, checking what tiktoken needs.

    Ranks must be 0..n-1 (the special tokens are numbered right after them) and all 256 single
    bytes must be present (otherwise some text could not be encoded at all).
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{where}: no such file; expected a tiktoken BPE file") from None
    except OSError as e:
        raise TokenizerError(f"{where}: cannot read tiktoken BPE file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (ValueError, binascii.Error):
            shown = line[:60].decode("utf-8", "replace")
            raise TokenizerError(
                f"{where}:{lineno}: expected '<base64 token> <rank>' in a tiktoken BPE file, got {shown!r}"
            ) from None
        if token in ranks:
            raise TokenizerError(f"{where}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{where}: empty tiktoken BPE file; expected '<base64 token> <rank>' lines")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{where}: tiktoken ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: tiktoken BPE file lacks {len(missing)} single-byte tokens (e.g. {missing[0]:#04x})")
    return ranks


def _chunks(text: str) -> Iterator[str]:
    """Cut `text` the way Meta's Llama 3 tokenizer does before handing it to tiktoken.

    First into MAX_ENCODE_CHARS slices; then inside each slice, any run of whitespace or of
    non-whitespace longer than MAX_RUN_CHARS is cut every MAX_RUN_CHARS characters.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        piece = text[start : start + MAX_ENCODE_CHARS]
        if len(piece) <= MAX_RUN_CHARS:
            yield piece
            continue
        begin = 0
        for run in _RUN.finditer(piece):
            a, b = run.span()
            for cut in range(a + MAX_RUN_CHARS, b, MAX_RUN_CHARS):
                yield piece[begin:cut]
                begin = cut
        yield piece[begin:]


class TiktokenTokenizer:
    """Llama 3's tokenizer: tiktoken BPE ranks + Llama 3's split regex + 256 special tokens."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Load a tiktoken BPE file; raise TokenizerError naming the file if it is malformed."""
        import tiktoken

        self.path = os.fspath(path)
        ranks = read_tiktoken_ranks(self.path)
        n = len(ranks)
        self.special_tokens: dict[str, int] = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._n_vocab = n + len(self.special_tokens)
        self.bos_id: int | None = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int | None = self.special_tokens["<|end_of_text|>"]
        # Llama 3.1's reference tokenizer pads with <|finetune_right_pad_id|>.
        self.pad_id: int | None = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids: frozenset[int] = collect_stop_ids(
            self.eos_id, {}, (self.special_tokens["<|eot_id|>"], self.special_tokens["<|eom_id|>"])
        )
        self.chat_template: str | None = None  # the rank file carries no template
        self.name: str = f"tiktoken:{self.path}"
        self.add_bos_default: bool = True

    @property
    def vocab_size(self) -> int:
        """Mergeable ranks plus the 256 special tokens."""
        return self._n_vocab

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; special-token strings are only recognised with `allow_special`."""
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        # disallowed_special=() stops tiktoken from raising on special-token text: it is then
        # encoded as ordinary text, which is what untrusted input needs.
        allowed: str | set[str] = "all" if allow_special else set()
        for chunk in _chunks(text):
            ids.extend(self._enc.encode(chunk, allowed_special=allowed, disallowed_special=()))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for `ids` (special tokens as their text; invalid UTF-8 as U+FFFD)."""
        self._check(ids)
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (a special token's text for specials)."""
        self._check([id])
        return self._enc.decode_single_token_bytes(int(id))

    def _check(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= int(i) < self._n_vocab:
                raise TokenizerError(f"{self.path}: token id {i} is outside the vocabulary (0..{self._n_vocab - 1})")

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"
