"""The packed token shard: the one on-disk format between tokenization and training.

A shard called ``NAME`` is three files side by side:

``NAME.tokens``
    Every token id of every document in the shard, one after another, as a flat array of
    little-endian unsigned integers with no header: ``uint16`` when the tokenizer's
    ``vocab_size <= 65536``, else ``uint32``. ``numpy.memmap(path, dtype="<u2")`` reads it
    (the nanoGPT / llama2.c layout).
``NAME.docs.npy``
    Document boundaries: an ``int64`` NumPy array of ``n_documents + 1`` offsets into
    ``NAME.tokens``; document ``i`` is ``tokens[docs[i]:docs[i + 1]]``, ``docs[0] == 0`` and
    ``docs[-1] == n_tokens``.
``NAME.json``
    Metadata, written last (its presence marks a complete shard)::

        {"format": "llamalab.tokens", "version": 1, "dtype": "uint16",
         "tokenizer": {"name": "sentencepiece:tok/llama.model", "sha256": "9e1f...",
                       "vocab_size": 32000, "bos_id": 1, "eos_id": 2},
         "vocab_size": 32000, "n_tokens": 1048712, "n_documents": 2311,
         "bos": true, "eos": true, "sources": ["data/wiki.jsonl"]}

Each document is encoded as LLaMA encodes training text: ``tokenizer.encode(text, bos=True,
eos=True)``, so every document starts with the bos id and ends with the eos id. A shard holds
whole documents only; `ShardWriter` starts a new shard once the current one holds at least
``shard_tokens`` tokens. Every file is written under a temporary name, fsynced and renamed, so a
crash never leaves a half-written file under a shard's name.

`read_shard` memory-maps a shard and checks it against its metadata; anything wrong raises
`DataError` naming the file and what was expected there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.data import DEFAULT_SHARD_TOKENS  # defined there so that CLI help needs no numpy
from llamalab.fsutil import fsync_path

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DataError",
    "Shard",
    "ShardWriter",
    "dtype_for_vocab",
    "find_shards",
    "read_shard",
    "shard_files",
    "tokenizer_identity",
]

FORMAT_NAME = "llamalab.tokens"
FORMAT_VERSION = 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SUFFIXES = (".tokens", ".docs.npy", ".json")


class DataError(ValueError):
    """Input data or a shard is missing, malformed, or not what the caller expected.

    The message names the file (and line, for JSONL input) and what was expected there.
    """


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits in 16 bits (``vocab_size <= 65536``), else ``uint32``."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size {vocab_size}: expected a positive vocabulary size")
    if vocab_size > 1 << 32:
        raise DataError(f"vocab_size {vocab_size}: expected at most 2**32 ids")
    return _DTYPES["uint16"] if vocab_size <= 1 << 16 else _DTYPES["uint32"]


def _tokenizer_file(tokenizer: Any) -> Path | None:
    """The file a tokenizer was loaded from: its ``path``, or the path in a ``kind:path`` name."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        name = str(getattr(tokenizer, "name", ""))
        path = name.split(":", 1)[1] if ":" in name else None
    if path is not None and os.path.isfile(path):
        return Path(path)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What a shard records about the tokenizer that wrote it.

    ``sha256`` is the hash of the tokenizer file (None when the tokenizer came from no file), so
    two shards can be checked to come from the same vocabulary even if the file was moved.
    """
    path = _tokenizer_file(tokenizer)
    return {
        "name": str(getattr(tokenizer, "name", type(tokenizer).__name__)),
        "sha256": _sha256(path) if path is not None else None,
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def shard_files(path: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(NAME.tokens, NAME.docs.npy, NAME.json)`` for a shard given by any of them or by ``NAME``."""
    p = Path(path)
    name = p.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = p.with_name(name)
    return stem.with_name(name + ".tokens"), stem.with_name(name + ".docs.npy"), stem.with_name(name + ".json")


def find_shards(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Shards named by ``paths``: a directory stands for every ``*.json`` shard in it (sorted by
    name), a file for its shard. Returned as ``NAME.json`` paths, in order, without repeats."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.with_suffix(".tokens").exists())
            if not found:
                raise DataError(f"{p}: no token shards (NAME.json + NAME.tokens) in this directory")
            out.extend(found)
        else:
            out.append(shard_files(p)[2])
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


@dataclass(frozen=True)
class Shard:
    """A memory-mapped shard. ``tokens`` and ``docs`` are read-only arrays backed by the files."""

    path: Path  # NAME.json
    tokens: np.ndarray  # (n_tokens,) uint16 or uint32
    docs: np.ndarray  # (n_documents + 1,) int64 offsets
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_documents(self) -> int:
        return int(self.docs.shape[0]) - 1

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (bos ... eos)."""
        if not 0 <= i < self.n_documents:
            raise IndexError(f"{self.path}: document {i} out of range (0..{self.n_documents - 1})")
        return self.tokens[int(self.docs[i]) : int(self.docs[i + 1])]

    def __len__(self) -> int:
        return self.n_documents


def _expect(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise DataError(f"{path}: {msg}")


def read_shard(path: str | os.PathLike[str], *, check_ids: bool = False) -> Shard:
    """Memory-map the shard at ``path`` (``NAME``, ``NAME.json``, ``NAME.tokens`` or ``NAME.docs.npy``).

    Checks the metadata (format, version, dtype against vocab_size, counts), the size of
    ``NAME.tokens`` and the offsets in ``NAME.docs.npy``. ``check_ids`` also reads every token to
    check it is below vocab_size. Raises DataError naming the file and what was expected.
    """
    tok_path, docs_path, meta_path = shard_files(path)
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: no such file; expected the metadata of a token shard "
                        f"(NAME.json beside NAME.tokens and NAME.docs.npy)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e}); expected token shard metadata") from None
    _expect(isinstance(meta, dict), meta_path, "expected a JSON object of token shard metadata")
    _expect(meta.get("format") == FORMAT_NAME, meta_path,
            f"format is {meta.get('format')!r}; expected {FORMAT_NAME!r}")
    _expect(meta.get("version") == FORMAT_VERSION, meta_path,
            f"format version {meta.get('version')!r}; expected {FORMAT_VERSION} (written by a different llamalab?)")
    for key in ("vocab_size", "n_tokens", "n_documents"):
        value = meta.get(key)
        _expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0, meta_path,
                f"{key} is {value!r}; expected a non-negative integer")
    vocab_size, n_tokens, n_docs = meta["vocab_size"], meta["n_tokens"], meta["n_documents"]
    _expect(vocab_size > 0, meta_path, "vocab_size is 0; expected a positive vocabulary size")
    expected_dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    _expect(meta.get("dtype") == expected_dtype, meta_path,
            f"dtype is {meta.get('dtype')!r}; expected {expected_dtype!r} for vocab_size {vocab_size}")
    dtype = _DTYPES[expected_dtype]

    if not tok_path.is_file():
        raise DataError(f"{tok_path}: no such file; expected the {n_tokens} token ids that {meta_path.name} describes")
    size = tok_path.stat().st_size
    _expect(size == n_tokens * dtype.itemsize, tok_path,
            f"{size} bytes; expected {n_tokens * dtype.itemsize} ({n_tokens} {expected_dtype} tokens, "
            f"as {meta_path.name} says): truncated or not this shard's file")
    if not docs_path.is_file():
        raise DataError(f"{docs_path}: no such file; expected the document offsets of {meta_path.name}")
    try:
        docs = np.load(docs_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{docs_path}: not a readable .npy array ({e}); expected int64 document offsets") from None
    _expect(docs.dtype == np.dtype("<i8") and docs.ndim == 1, docs_path,
            f"{docs.dtype} array of shape {docs.shape}; expected a 1-D int64 array")
    _expect(docs.shape[0] == n_docs + 1, docs_path,
            f"{docs.shape[0]} offsets; expected n_documents + 1 = {n_docs + 1}")
    _expect(int(docs[0]) == 0 and int(docs[-1]) == n_tokens, docs_path,
            f"offsets run from {int(docs[0])} to {int(docs[-1])}; expected 0 to n_tokens = {n_tokens}")
    _expect(bool(np.all(np.diff(docs) > 0)), docs_path, "offsets are not strictly increasing; expected "
            "each document to hold at least one token")
    tokens = np.memmap(tok_path, dtype=dtype, mode="r") if n_tokens else np.empty(0, dtype=dtype)
    if check_ids and n_tokens:
        top = int(tokens.max())
        _expect(top < vocab_size, tok_path, f"token id {top} is outside the vocabulary (0..{vocab_size - 1})")
    return Shard(path=meta_path, tokens=tokens, docs=docs, meta=meta)


class ShardWriter:
    """Write documents (already tokenized) into numbered shards ``PREFIX-00000`` ... in ``out_dir``.

    Memory stays bounded: token ids go to the shard's temporary file as they arrive (buffered
    ``buffer_tokens`` at a time); only the document offsets of the current shard are held. A new
    shard starts once the current one holds at least ``shard_tokens`` tokens, so shards keep
    whole documents. Use as a context manager, or call `close()`; it returns the ``NAME.json``
    paths written. On an exception inside the ``with`` block the current shard is discarded.

    ``tokenizer`` gives the identity and vocab_size recorded in the metadata (see
    `tokenizer_identity`); pass ``identity=`` instead to record one directly.
    """

    def __init__(self, out_dir: str | os.PathLike[str], tokenizer: Any = None, *,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str = "shard",
                 identity: dict[str, Any] | None = None, buffer_tokens: int = 1 << 20) -> None:
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens {shard_tokens}: expected a positive number of tokens per shard")
        if identity is None:
            if tokenizer is None:
                raise DataError("ShardWriter: expected a tokenizer (or identity=) to record in the metadata")
            identity = tokenizer_identity(tokenizer)
        self.identity = dict(identity)
        self.vocab_size = int(self.identity["vocab_size"])
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = int(shard_tokens)
        self.prefix = prefix
        self.buffer_tokens = int(buffer_tokens)
        self.paths: list[Path] = []
        self.n_tokens_total = 0
        self.n_documents_total = 0
        self._file: Any = None
        self._closed = False

    # -- the current shard -------------------------------------------------------------------
    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.paths):05d}"
        self._tok_path, self._docs_path, self._meta_path = shard_files(self.out_dir / name)
        for p in (self._tok_path, self._docs_path, self._meta_path):
            if p.exists():
                raise DataError(f"{p}: already exists; expected a new or empty output directory")
        self._tmp = self._tok_path.with_name(f".{self._tok_path.name}.tmp-{os.getpid()}")
        self._file = self._tmp.open("wb")
        self._offsets: list[int] = [0]
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._sources: list[str] = []

    def _flush_buffer(self) -> None:
        if self._buffer:
            self._file.write(np.concatenate(self._buffer).astype(self.dtype, copy=False).tobytes())
            self._buffer, self._buffered = [], 0

    def add_document(self, ids: Sequence[int] | np.ndarray, source: str | os.PathLike[str] | None = None) -> None:
        """Append one tokenized document (bos ... eos); ``source`` names the input file it came from."""
        if self._closed:
            raise DataError("ShardWriter: add_document after close()")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise DataError(f"{source or 'document'}: expected a non-empty 1-D sequence of token ids")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(f"{source or 'document'}: token id {bad} is outside the vocabulary "
                            f"(0..{self.vocab_size - 1})")
        if self._file is None:
            self._open()
        self._buffer.append(arr)
        self._buffered += arr.size
        self._offsets.append(self._offsets[-1] + arr.size)
        if source is not None and os.fspath(source) not in self._sources:
            self._sources.append(os.fspath(source))
        if self._buffered >= self.buffer_tokens:
            self._flush_buffer()
        if self._offsets[-1] >= self.shard_tokens:
            self._finish()

    def _write_atomic(self, final: Path, write: Any) -> None:
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def _finish(self) -> None:
        """Seal the current shard: tokens, then offsets, then the metadata that marks it complete."""
        self._flush_buffer()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._tok_path)
        offsets = np.asarray(self._offsets, dtype="<i8")
        self._write_atomic(self._docs_path, lambda f: np.save(f, offsets, allow_pickle=False))
        n_tokens, n_docs = int(offsets[-1]), len(offsets) - 1
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
            "tokenizer": self.identity,
            "vocab_size": self.vocab_size,
            "n_tokens": n_tokens,
            "n_documents": n_docs,
            "bos": True,
            "eos": True,
            "sources": self._sources,
        }
        text = json.dumps(meta, indent=2) + "\n"
        self._write_atomic(self._meta_path, lambda f: f.write(text.encode("utf-8")))
        fsync_path(self.out_dir)
        self.paths.append(self._meta_path)
        self.n_tokens_total += n_tokens
        self.n_documents_total += n_docs

    def close(self) -> list[Path]:
        """Seal the last shard (if it holds anything) and return every ``NAME.json`` written."""
        if not self._closed:
            if self._file is not None:
                self._finish()
            self._closed = True
        return list(self.paths)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); sealed shards stay."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
