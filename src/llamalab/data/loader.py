"""Batches for pretraining: a seeded, resumable mixture of token shards, and fixed-order validation.

Sampling, as `MixtureLoader` does it. Number the sequences of the whole run ``g = 0, 1, 2, ...``
(all data-parallel ranks together):

1. **Which source.** Sequence ``g`` comes from source ``s`` where ``u_g``, a uniform number
   hashed from ``(seed, g)``, falls in source ``s``'s slice of the cumulative mixture weights.
   So sources are drawn independently with probability equal to their (normalised) weight.
2. **Which window.** A source's shards are read as one concatenated token stream of ``L``
   tokens, cut into ``W = (L - 1) // seq_len`` windows; window ``i`` is the ``seq_len + 1``
   tokens starting at ``i * seq_len`` (consecutive windows share one token, so every token is a
   target exactly once per epoch). The ``k``-th sequence drawn from a source is window
   ``perm_e(k mod W)`` of epoch ``e = k // W``, where ``perm_e`` is a pseudorandom permutation of
   ``0..W-1`` keyed by ``(seed, source, e)``: a Feistel network, so it costs no memory however
   large the source, and every epoch visits every window once in a fresh order.
3. **Which rank.** Step ``t`` uses sequences ``g = t*G .. t*G + G - 1`` with ``G = world_size *
   batch_size``; rank ``r`` takes the ``r``-th slice of ``batch_size`` of them. Ranks are thus
   disjoint and together are exactly what one rank with batch size ``G`` would see.

Windows cross document boundaries (packing). ``doc_ids`` numbers the documents within each row
from 0, so ``model(tokens, doc_ids=doc_ids)`` applies Llama 3's document mask.

The whole state is ``g`` and how many sequences each source has given, so `state_dict()` is
small, identical on every rank, and `load_state_dict()` continues exactly: no sequence repeats
or is skipped.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shards import DataError, Shard, find_shards, read_shard

__all__ = ["LLAMA1_MIXTURE", "MixtureLoader", "TokenStream", "eval_batches", "feistel_permute", "mixture_sources"]

# LLaMA 1's pretraining mixture (Touvron et al. 2023, Table 1: sampling proportions).
LLAMA1_MIXTURE: dict[str, float] = {
    "commoncrawl": 0.67,
    "c4": 0.15,
    "github": 0.045,
    "wikipedia": 0.045,
    "books": 0.045,
    "arxiv": 0.025,
    "stackexchange": 0.02,
}

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 values (vectorised)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _keys(*words: int, n: int = 1) -> np.ndarray:
    """``n`` uint64 keys derived from integers (NumPy's SeedSequence hashing)."""
    words64 = [int(w) & 0xFFFFFFFFFFFFFFFF for w in words]
    return np.random.SeedSequence([w & 0xFFFFFFFF for w in words64] + [w >> 32 for w in words64]
                                  ).generate_state(n, dtype=np.uint64)


def feistel_permute(index: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """``perm(index)`` for a pseudorandom permutation of ``0..n-1`` given by ``keys`` (one per round).

    A balanced Feistel network on the smallest ``2h``-bit domain holding ``n`` is a permutation
    of that domain; applying it again to results ``>= n`` ("cycle walking") restricts it to a
    permutation of ``0..n-1``. The domain is under ``4n``, so few rounds of walking are needed.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << shift) | right

    out = encrypt(index)
    todo = out >= np.uint64(n)
    while todo.any():
        out[todo] = encrypt(out[todo])
        todo = out >= np.uint64(n)
    return out


class TokenStream:
    """Shards read as one stream of tokens, with the global document index of every token."""

    def __init__(self, shards: Sequence[Shard], name: str = "stream") -> None:
        self.name = name
        self.shards = list(shards)
        self.token_offsets = np.cumsum([0] + [s.n_tokens for s in self.shards], dtype=np.int64)
        self.doc_offsets = np.cumsum([0] + [s.n_documents for s in self.shards], dtype=np.int64)
        self.n_tokens = int(self.token_offsets[-1])
        if self.shards:
            sizes = {s.vocab_size for s in self.shards}
            ids = {(s.meta.get("tokenizer") or {}).get("sha256") for s in self.shards}
            if len(sizes) > 1 or len(ids) > 1:
                raise DataError(f"{self.shards[0].path}: {name} mixes shards of different tokenizers "
                                f"(vocab sizes {sorted(sizes)}); expected one tokenizer throughout")

    @classmethod
    def open(cls, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
             name: str = "stream") -> TokenStream:
        return cls([read_shard(p) for p in find_shards(paths)], name)

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, doc_index)`` (int64 each) for ``length`` tokens from ``start`` in the stream."""
        tokens = np.empty(length, dtype=np.int64)
        docs = np.empty(length, dtype=np.int64)
        pos, end = start, start + length
        i = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        while pos < end:
            shard = self.shards[i]
            lo = pos - int(self.token_offsets[i])
            hi = min(shard.n_tokens, end - int(self.token_offsets[i]))
            out = slice(pos - start, pos - start + hi - lo)
            tokens[out] = shard.tokens[lo:hi]
            docs[out] = np.searchsorted(shard.docs, np.arange(lo, hi), side="right") - 1 + self.doc_offsets[i]
            pos += hi - lo
            i += 1
        return tokens, docs


def _row(tokens: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tokens, docs - docs[0]


def _batch(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([t for t, _ in rows])), torch.from_numpy(np.stack([d for _, d in rows])))


def mixture_sources(root: str | os.PathLike[str], weights: Mapping[str, float] = LLAMA1_MIXTURE
                    ) -> dict[str, tuple[list[Path], float]]:
    """``{name: ([root/name], weight)}``: a mixture whose sources are the subdirectories of ``root``."""
    return {name: ([Path(root) / name], float(w)) for name, w in weights.items()}


class MixtureLoader:
    """Endless batches ``(tokens, doc_ids)``, each int64 of shape ``(batch_size, seq_len + 1)``.

    ``sources`` maps a name to ``(shard paths or directories, weight)``; weights are normalised.
    Inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``. See the module docstring for how
    sequences are drawn; everything follows from ``seed``, so two loaders with the same arguments
    yield the same batches.
    """

    def __init__(self, sources: Mapping[str, tuple[Sequence[str | os.PathLike[str]] | str | os.PathLike[str], float]],
                 *, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise DataError(f"seq_len {seq_len}, batch_size {batch_size}: expected positive integers")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank}, world_size {world_size}: expected 0 <= rank < world_size")
        if not sources:
            raise DataError("MixtureLoader: expected at least one source")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.names = sorted(sources)
        weights = np.array([float(sources[n][1]) for n in self.names])
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise DataError(f"mixture weights {dict(zip(self.names, weights.tolist()))}: expected non-negative "
                            f"numbers with a positive sum")
        self.weights = weights / weights.sum()
        self._cdf = np.cumsum(self.weights)
        self._cdf[-1] = 1.0  # u < 1 always lands on a source of positive weight
        self.streams = [TokenStream.open(sources[n][0], name=n) for n in self.names]
        self.n_windows = []
        for name, stream, w in zip(self.names, self.streams, self.weights):
            n = (stream.n_tokens - 1) // self.seq_len if stream.n_tokens else 0
            if n <= 0 and w > 0:
                raise DataError(f"source {name!r}: {stream.n_tokens} tokens; expected at least seq_len + 1 = "
                                f"{self.seq_len + 1}")
            self.n_windows.append(n)
        self._choice_key = _keys(self.seed, 0x6D6978)[0]  # "mix"
        self._source_tags = [zlib.crc32(n.encode("utf-8")) for n in self.names]
        self._perm_keys: dict[tuple[int, int], np.ndarray] = {}
        self.next_sequence = 0  # g of the first sequence of the next global batch
        self.taken = [0] * len(self.names)  # sequences drawn so far from each source

    # -- sampling ----------------------------------------------------------------------------
    def source_of(self, g: np.ndarray) -> np.ndarray:
        """The source index of global sequences ``g`` (a pure function of seed and g)."""
        bits = _mix64(np.asarray(g, dtype=np.uint64) ^ self._choice_key)
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.names) - 1)

    def _window(self, s: int, k: int) -> int:
        """The window of the ``k``-th sequence drawn from source ``s``."""
        n = self.n_windows[s]
        epoch, i = divmod(k, n)
        key = self._perm_keys.get((s, epoch))
        if key is None:
            key = self._perm_keys[(s, epoch)] = _keys(self.seed, self._source_tags[s], epoch, n=6)
        return int(feistel_permute(np.array([i]), n, key)[0])

    def _plan(self) -> list[tuple[int, int]]:
        """``(source, draw number)`` of every sequence in the next global batch; advances the state."""
        g = np.arange(self.next_sequence, self.next_sequence + self.world_size * self.batch_size, dtype=np.uint64)
        src = self.source_of(g)
        plan = []
        for s in src.tolist():
            plan.append((s, self.taken[s]))
            self.taken[s] += 1
        self.next_sequence += len(src)
        return plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._plan()[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = []
        for s, k in plan:
            start = self._window(s, k) * self.seq_len
            rows.append(_row(*self.streams[s].read(start, self.seq_len + 1)))
        return _batch(rows)

    # -- progress and resumption ---------------------------------------------------------------
    def epochs(self) -> dict[str, float]:
        """How many passes over each source have been drawn so far (fractional)."""
        return {n: (t / w if w else 0.0) for n, t, w in zip(self.names, self.taken, self.n_windows)}

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: plain ints and strings (JSON- and torch.save-able), the same on
        every rank. Batch size and world size may change on resume; the global order is kept."""
        return {
            "format": "llamalab.mixture_loader",
            "version": 1,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "next_sequence": self.next_sequence,
            "sources": {n: {"weight": float(w), "n_tokens": st.n_tokens, "taken": t}
                        for n, w, st, t in zip(self.names, self.weights, self.streams, self.taken)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`; raises DataError if it belongs to another data setup."""
        if state.get("format") != "llamalab.mixture_loader" or state.get("version") != 1:
            raise DataError(f"loader state {state.get('format')!r} v{state.get('version')!r}; expected "
                            f"'llamalab.mixture_loader' v1")
        for key in ("seed", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)!r}; this loader has {getattr(self, key)!r}")
        saved = state.get("sources") or {}
        if sorted(saved) != self.names:
            raise DataError(f"loader state has sources {sorted(saved)}; this loader has {self.names}")
        for n, w, st in zip(self.names, self.weights, self.streams):
            entry = saved[n]
            if entry.get("n_tokens") != st.n_tokens or not np.isclose(entry.get("weight", -1), w):
                raise DataError(f"loader state for source {n!r}: {entry.get('n_tokens')} tokens at weight "
                                f"{entry.get('weight')}; this loader has {st.n_tokens} at {w:g} (different shards "
                                f"or mixture)")
        self.next_sequence = int(state["next_sequence"])
        self.taken = [int(saved[n]["taken"]) for n in self.names]


def eval_batches(shards: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], seq_len: int, batch_size: int,
                 max_batches: int | None = None, *, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in a fixed order: consecutive windows of held-out shards.

    The shards (files or directories, in the order given) are one token stream cut into
    consecutive ``seq_len + 1``-token windows (sharing one token, as in training). Batch ``b``
    holds windows ``b*batch_size ...``; with ``world_size > 1`` rank ``r`` gets batches
    ``r, r + world_size, ...``. The last batch may be smaller unless ``drop_last``. At most
    ``max_batches`` batches are yielded per rank.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise DataError(f"seq_len {seq_len}, batch_size {batch_size}: expected positive integers")
    stream = TokenStream.open(shards, name="validation")
    n_windows = max(0, (stream.n_tokens - 1) // seq_len)
    if n_windows == 0:
        raise DataError(f"{stream.shards[0].path if stream.shards else shards}: {stream.n_tokens} held-out tokens; "
                        f"expected at least seq_len + 1 = {seq_len + 1}")
    n_batches = n_windows // batch_size if drop_last else -(-n_windows // batch_size)
    yielded = 0
    for b in range(rank, n_batches, world_size):
        if max_batches is not None and yielded >= max_batches:
            return
        windows = range(b * batch_size, min(n_windows, (b + 1) * batch_size))
        yield _batch([_row(*stream.read(w * seq_len, seq_len + 1)) for w in windows])
        yielded += 1
