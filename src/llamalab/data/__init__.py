"""The data stage: text files → packed token shards → batches for pretraining.

- `shards`: the token shard format (``NAME.tokens`` + ``NAME.docs.npy`` + ``NAME.json``),
  `ShardWriter` and `read_shard`.
- `tokenize`: `tokenize_files` turns .txt/.jsonl files into shards (``llamalab tokenize``).
- `loader`: `MixtureLoader`, a seeded, resumable, data-parallel mixture of sources, and
  `eval_batches` for validation in a fixed order.
"""

from __future__ import annotations

from .loader import LLAMA1_MIXTURE, MixtureLoader, TokenStream, eval_batches, mixture_sources
from .shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    DataError,
    Shard,
    ShardWriter,
    dtype_for_vocab,
    find_shards,
    read_shard,
    tokenizer_identity,
)
from .tokenize import iter_documents, tokenize_files

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LLAMA1_MIXTURE",
    "DataError",
    "MixtureLoader",
    "Shard",
    "ShardWriter",
    "TokenStream",
    "dtype_for_vocab",
    "eval_batches",
    "find_shards",
    "iter_documents",
    "mixture_sources",
    "read_shard",
    "tokenize_files",
    "tokenizer_identity",
]
