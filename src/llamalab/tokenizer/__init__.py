"""Tokenizers for LLaMA-family models behind one `Tokenizer` protocol.

- `SentencePieceTokenizer`: LLaMA 1/2 `tokenizer.model` (SentencePiece BPE).
- `TiktokenTokenizer`: Llama 3 `tokenizer.model` (tiktoken ranks + 256 special tokens).
- `HFTokenizer`: a Hugging Face `tokenizer.json`, or a vocabulary rebuilt from GGUF metadata
  by `tokenizer_from_gguf`.
- `load_tokenizer(path)` picks the right one; `train_sentencepiece` trains a LLaMA-style model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Tokenizer, TokenizerError
from .gguf_vocab import read_gguf_fields, tokenizer_from_gguf
from .hf import HFTokenizer
from .sp import SentencePieceTokenizer
from .tiktoken_bpe import TiktokenTokenizer, looks_like_tiktoken
from .train import LLAMA_TRAINER_DEFAULTS, train_sentencepiece

__all__ = [
    "HFTokenizer",
    "LLAMA_TRAINER_DEFAULTS",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "tokenizer_from_gguf",
    "train_sentencepiece",
]

_EXPECTED = (
    "expected a directory with tokenizer.json or tokenizer.model, a Hugging Face tokenizer.json, "
    "a SentencePiece or tiktoken tokenizer.model, or a .gguf file"
)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer at `path`, choosing the implementation from what the file contains.

    A directory is searched for tokenizer.json, then tokenizer.model. `*.json` loads as an
    HFTokenizer, `*.gguf` from its embedded vocabulary; any other file is sniffed: a text file of
    `base64 rank` lines is a tiktoken (Llama 3) model, anything else is tried as SentencePiece.
    Raises TokenizerError naming the file and the accepted formats.
    """
    p = Path(path)
    if p.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if (p / candidate).is_file():
                return load_tokenizer(p / candidate)
        raise TokenizerError(f"{p}: directory has no tokenizer.json or tokenizer.model; {_EXPECTED}")
    if not p.is_file():
        raise TokenizerError(f"{p}: no such file or directory; {_EXPECTED}")
    if p.suffix == ".json":
        return HFTokenizer.from_file(p)
    if p.suffix == ".gguf":
        return tokenizer_from_gguf(read_gguf_fields(str(p)), source=str(p))
    if looks_like_tiktoken(p):
        return TiktokenTokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except TokenizerError:
        raise TokenizerError(f"{p}: not a SentencePiece model nor a tiktoken BPE file; {_EXPECTED}") from None
