"""Text files in, packed token shards out (`tokenize_files`, behind ``llamalab tokenize``)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.textio import iter_jsonl_texts

from .shards import DEFAULT_SHARD_TOKENS, DataError, ShardWriter, _tokenizer_file, tokenizer_identity

__all__ = ["iter_documents", "tokenize_files"]

_BATCH_DOCS = 64  # documents per task sent to a worker


def iter_documents(path: str | os.PathLike[str], *, text_field: str = "text",
                   split_lines: bool = False) -> Iterator[str]:
    """The documents of one input file, streamed.

    ``.jsonl``: one document per line, the string in ``text_field`` (blank lines skipped).
    ``.txt``: the whole file is one document; with ``split_lines`` every non-empty line is one.
    Empty documents are skipped. Raises DataError naming the file (and line) for bad input.
    """
    p = Path(path)
    try:
        if p.suffix == ".jsonl":
            for text in iter_jsonl_texts(p, text_field, DataError):
                if text:
                    yield text
        elif p.suffix == ".txt":
            with p.open(encoding="utf-8") as f:
                if split_lines:
                    for line in f:
                        line = line.rstrip("\r\n")
                        if line:
                            yield line
                else:
                    text = f.read()
                    if text:
                        yield text
        else:
            raise DataError(f"{p}: unsupported input; expected a .txt or .jsonl file")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# -- worker processes ------------------------------------------------------------------------
_worker_tok: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tok
    if isinstance(tokenizer, (str, os.PathLike)):
        from llamalab.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    _worker_tok = tokenizer


def _encode_batch(texts: list[str], tokenizer: Any = None) -> list[np.ndarray]:
    tok = tokenizer if tokenizer is not None else _worker_tok
    return [np.asarray(tok.encode(t, bos=True, eos=True), dtype=np.int64) for t in texts]


def _batches(inputs: Sequence[Path], text_field: str, split_lines: bool) -> Iterator[tuple[Path, list[str]]]:
    for path in inputs:
        batch: list[str] = []
        for text in iter_documents(path, text_field=text_field, split_lines=split_lines):
            batch.append(text)
            if len(batch) >= _BATCH_DOCS:
                yield path, batch
                batch = []
        if batch:
            yield path, batch


class _Progress:
    """A one-line progress report on stderr, at most every `every` seconds."""

    def __init__(self, total_bytes: int, enabled: bool, every: float = 2.0) -> None:
        self.total_bytes, self.enabled, self.every = total_bytes, enabled, every
        self.t0 = self.last = time.perf_counter()
        self.docs = self.tokens = self.chars = 0

    def update(self, docs: int, tokens: int, chars: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.chars += chars
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._print(now, end="\r")

    def _print(self, now: float, end: str) -> None:
        dt = max(now - self.t0, 1e-9)
        pct = f" ({min(100.0, 100 * self.chars / self.total_bytes):.0f}% of input)" if self.total_bytes else ""
        print(f"tokenize: {self.docs:,} documents, {self.tokens:,} tokens{pct}, {self.tokens / dt:,.0f} tok/s",
              file=sys.stderr, end=end, flush=True)

    def done(self) -> None:
        if self.enabled:
            self._print(time.perf_counter(), end="\n")


def tokenize_files(
    inputs: Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    split_lines: bool = False,
    num_workers: int = 0,
    prefix: str = "shard",
    progress: bool = True,
) -> list[Path]:
    """Tokenize ``.txt``/``.jsonl`` files into packed shards in ``out_dir``; return their ``NAME.json`` paths.

    Each document (see `iter_documents`) is encoded with ``tokenizer.encode(text, bos=True,
    eos=True)``, as LLaMA's pretraining data is, and documents are written in input order.
    ``tokenizer`` is a `Tokenizer` or a path for `load_tokenizer`. ``num_workers > 0`` encodes in
    that many processes (the output is the same); at most ``2 * num_workers`` batches of text are
    in flight, so memory stays bounded. ``out_dir`` must not already hold shards named ``prefix``.
    """
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise DataError("tokenize: expected at least one .txt or .jsonl input file")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file; expected a .txt or .jsonl input")
        if p.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{p}: unsupported input; expected a .txt or .jsonl file")
    if num_workers < 0:
        raise DataError(f"num_workers {num_workers}: expected 0 (in this process) or more")
    tok_source: Any = tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        from llamalab.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    else:
        tok_source = _tokenizer_file(tokenizer) or tokenizer  # workers reload it from its file
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise DataError(f"{tokenizer.name}: the tokenizer has no {'bos' if tokenizer.bos_id is None else 'eos'} "
                        f"token; expected one to mark document boundaries")
    out = Path(out_dir)
    if out.is_dir():
        existing = sorted(out.glob(f"{prefix}-*.json")) + sorted(out.glob(f"{prefix}-*.tokens"))
        if existing:
            raise DataError(f"{existing[0]}: {out} already holds {prefix!r} shards; expected a new or empty "
                            f"output directory (or another --prefix)")

    report = _Progress(sum(p.stat().st_size for p in paths), progress)
    writer = ShardWriter(out, identity=tokenizer_identity(tokenizer), shard_tokens=shard_tokens, prefix=prefix)
    pool = None
    try:
        if num_workers > 0:
            # spawn, not fork: the parent may hold torch's or the tokenizer's threads. A worker that
            # cannot start breaks the pool (an error), where multiprocessing.Pool would respawn it forever.
            pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(tok_source,))
        pending: deque[tuple[Path, list[str], Any]] = deque()

        def drain_one() -> None:
            path, texts, result = pending.popleft()
            try:
                encoded = result.result() if pool is not None else result
            except BrokenProcessPool as e:
                raise DataError(f"tokenize: a worker process failed ({e}); try num_workers=0") from None
            for ids in encoded:
                writer.add_document(ids, source=path)
            report.update(len(encoded), sum(len(ids) for ids in encoded), sum(len(t) for t in texts))

        for path, texts in _batches(paths, text_field, split_lines):
            if pool is not None:
                pending.append((path, texts, pool.submit(_encode_batch, texts)))
                if len(pending) >= 2 * num_workers:
                    drain_one()
            else:
                pending.append((path, texts, _encode_batch(texts, tokenizer)))
                drain_one()
        while pending:
            drain_one()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    written = writer.close()
    report.done()
    if not written:
        raise DataError(f"{', '.join(map(str, paths))}: no documents found; expected non-empty text")
    return written
