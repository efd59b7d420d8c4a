"""Perplexity of text files, with a sliding window.

The text is tokenized whole and scored in windows of at most ``window`` tokens. The first
window predicts its tokens from the BOS (or EOS) token; each later one predicts the next
``stride`` tokens, seeing the ``window - stride`` tokens before them as context. ``stride ==
window`` gives disjoint windows (lm-eval's ``loglikelihood_rolling``: fastest, each window
starts nearly blind); a smaller stride gives every prediction more context (lower, fairer
perplexity, ``window / stride`` times the compute), as in the transformers perplexity guide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamalab.eval.base import TaskResult
from llamalab.eval.lm import sliding_windows
from llamalab.textio import read_documents

if TYPE_CHECKING:
    from llamalab.eval.lm import EvalModel

__all__ = ["PerplexityResult", "file_perplexity", "read_texts", "text_perplexity"]


@dataclass
class PerplexityResult:
    """The total negative log-likelihood of a text and the units it is spread over."""

    nll: float  # nats
    tokens: int
    bytes: int
    words: int

    @property
    def ppl(self) -> float:
        """Token-level perplexity, exp(mean NLL per token)."""
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """NLL in bits per UTF-8 byte (comparable across tokenizers)."""
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    @property
    def word_ppl(self) -> float:
        """Perplexity per whitespace-separated word (comparable across tokenizers)."""
        return math.exp(self.nll / self.words) if self.words else math.nan

    def __add__(self, other: PerplexityResult) -> PerplexityResult:
        return PerplexityResult(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes,
                                self.words + other.words)


def text_perplexity(lm: EvalModel, texts: Sequence[str], *, window: int | None = None, stride: int | None = None,
                    progress: bool = False) -> PerplexityResult:
    """Summed NLL of ``texts`` (each scored on its own) with a sliding window; defaults: the model's
    context as the window, half of it as the stride."""
    window = window or lm.max_length
    if window > lm.max_length:
        raise ValueError(f"--window {window}: longer than the model's context ({lm.max_length} tokens)")
    stride = stride or max(1, window // 2)
    pairs = []
    total = PerplexityResult(0.0, 0, 0, 0)
    for text in texts:
        ids = lm.encode(text)
        doc_pairs = sliding_windows(ids, lm.prefix_token_id, window, stride, reuse_prefix=True)
        pairs += doc_pairs
        total += PerplexityResult(0.0, sum(len(p) for _, p in doc_pairs), len(text.encode()), len(text.split()))
    scores = lm.loglikelihood_tokens(pairs, progress=progress, desc="perplexity")
    total.nll = -sum(s for s, _ in scores)
    return total


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """A file's documents: the whole of a text file, or each ``{"text": ...}`` line of a .jsonl file."""
    return read_documents(path, "a .txt or .jsonl file to score")


def file_perplexity(lm: EvalModel, path: str | os.PathLike[str], *, window: int | None = None,
                    stride: int | None = None, progress: bool = False) -> list[TaskResult]:
    """Rows ``ppl``, ``bits_per_byte`` and ``word_ppl`` for one file."""
    texts = [t for t in read_texts(path) if t]
    if not texts:
        raise ValueError(f"{path}: no text to score")
    window = window or lm.max_length
    stride = stride or max(1, window // 2)
    r = text_perplexity(lm, texts, window=window, stride=stride, progress=progress)
    details = {"source": str(path), "documents": len(texts), "window": window, "stride": stride,
               "tokens": r.tokens, "bytes": r.bytes, "words": r.words, "nll": r.nll}
    name = f"perplexity:{Path(path).name}"
    return [TaskResult(name, "ppl", r.ppl, None, r.tokens, dict(details, headline=True)),
            TaskResult(name, "bits_per_byte", r.bits_per_byte, None, r.tokens, details),
            TaskResult(name, "word_ppl", r.word_ppl, None, r.tokens, details)]
