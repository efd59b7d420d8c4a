"""The mixture: each processed source sampled for its epochs, then tokenized into shards.

LLaMA 1 trains on each source for a number of epochs (Table 1: CommonCrawl 1.10, C4 1.06, GitHub
0.64, Wikipedia 2.45, Books 2.23, ArXiv 1.06, StackExchange 1.03), which with the paper's source
sizes gives its sampling proportions (67 / 15 / 4.5 / 4.5 / 4.5 / 2.5 / 2 %). Here:

- by default, source ``s`` contributes ``epochs_s`` passes over its documents: ``floor(epochs)``
  whole passes, then each document once more with probability ``frac(epochs)``, decided by a hash
  of ``(seed, source, pass, document index)``: deterministic, streaming, no shuffle buffer;
- with ``mixture.total_tokens``, the epochs follow from the proportions instead:
  ``epochs_s = weight_s * total_tokens / tokens_s`` (``tokens_s`` counted with the tokenizer).

Each source's sample is tokenized with `llamalab.data.tokenize_files` (bos + eos per document)
into ``RUN_DIR/shards/<source>/``; ``RUN_DIR/mixture.json`` records documents and tokens per
source, and ``RUN_DIR/mixture.toml`` is the ``[data.sources.*]`` block a pretraining config uses
(the loader draws sequences by the weights and shuffles windows, so shard order does not matter).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import DataRunConfig

__all__ = ["build_mixture", "sample_passes"]


def _uniform(seed: int, source: str, epoch: int, index: int) -> float:
    """A uniform number in [0, 1) fixed by its arguments."""
    digest = hashlib.blake2b(f"{seed}\0{source}\0{epoch}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample_passes(n_docs: int, epochs: float, *, seed: int, source: str) -> Iterator[tuple[int, int]]:
    """``(pass, document index)`` pairs of a source's sample, in order.

    ``floor(epochs)`` full passes, then a partial pass where each document is drawn with
    probability ``epochs - floor(epochs)``.
    """
    for k, keep in _passes(epochs, seed=seed, source=source):
        for i in range(n_docs):
            if keep(i):
                yield k, i


def _passes(epochs: float, *, seed: int, source: str) -> list[tuple[int, Any]]:
    """One ``(pass, keep(index) -> bool)`` per pass over a source."""
    if epochs < 0 or not math.isfinite(epochs):
        raise ValueError(f"source {source!r}: epochs {epochs}: expected a non-negative number")
    full = math.floor(epochs)
    frac = epochs - full
    passes: list[tuple[int, Any]] = [(k, lambda i: True) for k in range(full)]
    if frac > 0:
        passes.append((full, lambda i: _uniform(seed, source, full, i) < frac))
    return passes


def _documents(output_dir: str) -> Iterator[str]:
    """The texts of a source's processed output, in file order, streamed."""
    from llamalab.data.tokenize import iter_documents

    files = sorted(Path(output_dir).glob("*.jsonl")) if os.path.isdir(output_dir) else []
    for path in files:
        yield from iter_documents(path)


def build_mixture(cfg: DataRunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Sample every source and tokenize it into ``RUN_DIR/shards/<source>``; returns the summary.

    A source whose shards are complete (``.done`` marker) is not redone, so a re-run resumes.
    """
    from llamalab.data.shards import read_shard
    from llamalab.data.tokenize import tokenize_files
    from llamalab.tokenizer import load_tokenizer

    if not cfg.mixture.tokenizer:
        raise ValueError(f"{cfg.path}: mixture.tokenizer is not set; expected the tokenizer to shard with")
    tokenizer = load_tokenizer(cfg.mixture.tokenizer)
    run = Path(cfg.run_dir)
    weights = {name: cfg.weight(name) for name in cfg.sources}
    total_weight = sum(weights.values())
    if total_weight <= 0:
        raise ValueError(f"{cfg.path}: mixture weights sum to 0; expected a positive total")
    summary: dict[str, Any] = {"tokenizer": cfg.mixture.tokenizer, "seed": cfg.mixture.seed, "sources": {}}
    for name in cfg.sources:
        out = run / "shards" / name
        done = out / ".done"
        if done.is_file():
            summary["sources"][name] = json.loads(done.read_text())
            continue
        source_out = os.path.join(cfg.source_dir(name), "output")
        n_source = sum(1 for _ in _documents(source_out))
        weight = weights[name] / total_weight
        if cfg.mixture.total_tokens:
            tokens = sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in _documents(source_out))
            epochs = weight * cfg.mixture.total_tokens / tokens if tokens else 0.0
        else:
            epochs = cfg.epochs(name)
        sample = run / "mixture" / f"{name}.jsonl"
        sample.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        with sample.open("w", encoding="utf-8") as f:
            for _k, keep in _passes(epochs, seed=cfg.mixture.seed, source=name):
                for i, text in enumerate(_documents(source_out)):
                    if keep(i):
                        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                        n += 1
        if out.exists():
            shutil.rmtree(out)  # a half-written shard set from a killed run
        entry = {"documents": 0, "tokens": 0, "weight": weight, "epochs": epochs, "source_documents": n_source,
                 "shards": str(out)}
        if n:
            if progress:
                print(f"data mixture: {name}: {n:,} documents ({epochs:.2f} epochs of {n_source:,})",
                      file=sys.stderr, flush=True)
            paths = tokenize_files([sample], tokenizer, out, shard_tokens=cfg.mixture.shard_tokens,
                                   num_workers=cfg.mixture.num_workers, progress=progress)
            shards = [read_shard(p) for p in paths]
            entry.update(documents=sum(s.n_documents for s in shards), tokens=sum(s.n_tokens for s in shards))
        else:
            out.mkdir(parents=True, exist_ok=True)
        sample.unlink()
        done.write_text(json.dumps(entry))
        summary["sources"][name] = entry
    (run / "mixture.json").write_text(json.dumps(summary, indent=2) + "\n")
    toml = [f"# written by `llamalab data run` from {cfg.path}: paste into a pretraining config", "[data]",
            f'tokenizer = "{cfg.mixture.tokenizer}"']
    for name, entry in summary["sources"].items():
        if entry["tokens"]:
            toml += ["", f"[data.sources.{name}]", f'shards = "{entry["shards"]}"', f"weight = {entry['weight']:.6g}"]
    (run / "mixture.toml").write_text("\n".join(toml) + "\n")
    return summary
