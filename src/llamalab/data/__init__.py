"""The data stage: text files → packed token shards → batches for pretraining.

- `shards`: the token shard format (``NAME.tokens`` + ``NAME.docs.npy`` + ``NAME.json``),
  `ShardWriter` and `read_shard`.
- `tokenize`: `tokenize_files` turns .txt/.jsonl files into shards (``llamalab tokenize``).
- `loader`: `MixtureLoader`, a seeded, resumable, data-parallel mixture of sources, and
  `eval_batches` for validation in a fixed order.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Here rather than in `shards` (which re-exports it) so that `llamalab tokenize --help` can show
# it without importing numpy.
DEFAULT_SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MiB of uint16 per shard

# Which submodule defines each public name. They are imported on first use, because `loader`
# pulls in torch and `shards` numpy, and `llamalab.data.cli` (imported for `llamalab --help`)
# lives in this package.
_SUBMODULE = {
    "LLAMA1_MIXTURE": "loader", "MixtureLoader": "loader", "TokenStream": "loader", "eval_batches": "loader",
    "mixture_sources": "loader",
    "FORMAT_NAME": "shards", "FORMAT_VERSION": "shards", "DataError": "shards", "Shard": "shards",
    "ShardWriter": "shards", "dtype_for_vocab": "shards", "find_shards": "shards", "read_shard": "shards",
    "tokenizer_identity": "shards",
    "iter_documents": "tokenize", "tokenize_files": "tokenize",
}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` (a public name of this package) and return it."""
    if name in _SUBMODULE:
        return getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
