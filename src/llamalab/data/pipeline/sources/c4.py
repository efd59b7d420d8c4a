"""C4: the heuristic web-text cleaning of Raffel et al. (2020), as LLaMA used it.

Steps after the reader:

1. ``C4LineFilter``: keep lines that end in terminal punctuation and have >= 5 words, drop lines
   mentioning "javascript" or cookie / privacy-policy / terms boilerplate; drop the document if
   it contains "lorem ipsum" or a curly bracket, or has fewer than 3 sentences left.
2. ``SentenceSpanDedup``: every 3-sentence span seen before (in this task's share of the input)
   is removed; a document left with fewer than 3 sentences is dropped.
3. Language ID (fastText lid.176) keeping English, from the engine's ``common.py``.

The thresholds follow the C4 paper (not TFDS's or datatrove's C4 defaults, which use 3 words per
line and 5 sentences per page).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from . import SourceFilter, resolve_options

DEFAULTS: dict[str, Any] = {
    "min_words_per_line": 5,
    "min_sentences": 3,
    "terminal_punctuation": [".", "!", "?", '"'],
    "drop_javascript_lines": True,
    "policy_substrings": [
        "terms of use",
        "terms of service",
        "privacy policy",
        "cookie policy",
        "uses cookies",
        "use of cookies",
        "use cookies",
    ],
    "drop_lorem_ipsum": True,
    "drop_curly_bracket": True,
    "span_dedup": True,
    "span_sentences": 3,
    "languages": ["en"],
    # C4 kept pages langdetect scored >= 0.99 English. fastText lid.176 is calibrated differently
    # (clean three-sentence English paragraphs score 0.95-0.96), so we use CCNet's threshold for it.
    "language_threshold": 0.5,
    "language_id": True,
}

# A sentence ends at . ! or ? (runs of them, optionally followed by closing quotes/brackets)
# before whitespace or the end of the line. Deliberately simple and dependency-free: NLTK's
# Punkt model would need a download.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences: line breaks and sentence-final . ! ? followed by space end one."""
    sentences: list[str] = []
    for line in text.split("\n"):
        for part in _SENTENCE_END.split(line.strip()):
            if part.strip():
                sentences.append(part.strip())
    return sentences


class C4LineFilter(SourceFilter):
    """C4's line- and page-level rules; the kept lines replace the document's text."""

    name = "C4 lines"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="c4_lines", **kwargs)
        self.min_words = int(options["min_words_per_line"])
        self.min_sentences = int(options["min_sentences"])
        self.end_marks = tuple(options["terminal_punctuation"])
        self.drop_javascript = bool(options["drop_javascript_lines"])
        self.policy = [s.lower() for s in options["policy_substrings"]]
        self.drop_lorem = bool(options["drop_lorem_ipsum"])
        self.drop_curly = bool(options["drop_curly_bracket"])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Rewrite ``doc.text`` to its kept lines, or drop the document with a reason."""
        lower = doc.text.lower()
        if self.drop_lorem and "lorem ipsum" in lower:
            return False, "lorem_ipsum"
        if self.drop_curly and "{" in doc.text:
            return False, "curly_bracket"
        kept: list[str] = []
        for line in doc.text.split("\n"):
            line = line.strip()
            if not line:
                continue
            low = line.lower()
            if not line.endswith(self.end_marks):
                self.stat_update("lines_dropped_no_terminal_punctuation")
            elif len(line.split()) < self.min_words:
                self.stat_update("lines_dropped_too_few_words")
            elif self.drop_javascript and "javascript" in low:
                self.stat_update("lines_dropped_javascript")
            elif any(p in low for p in self.policy):
                self.stat_update("lines_dropped_policy")
            else:
                kept.append(line)
        text = "\n".join(kept)
        if len(split_sentences(text)) < self.min_sentences:
            return False, "too_few_sentences"
        doc.text = text
        return True


def _span_key(sentences: list[str]) -> bytes:
    """Hash of a span of sentences, case- and whitespace-insensitive (first 8 bytes of SHA-1)."""
    norm = " ".join(" ".join(s.lower().split()) for s in sentences)
    return hashlib.sha1(norm.encode("utf-8")).digest()[:8]


class SentenceSpanDedup(SourceFilter):
    """Remove every span of ``span`` consecutive sentences already seen by this task.

    The "seen" set lives in this worker's memory and covers the documents of this task only:
    on an executor with N tasks, a span repeated across two tasks' files survives in both.
    Within a task the first occurrence is kept and later ones removed.
    """

    name = "C4 3-sentence span dedup"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="c4_span_dedup", **kwargs)
        self.span = int(options["span_sentences"])
        self.min_sentences = int(options["min_sentences"])
        self.seen: set[bytes] = set()

    def run(self, data, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN201 - datatrove's signature
        """Filter this task's documents with a fresh "seen" set."""
        self.seen = set()
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Drop the sentences of repeated spans; drop the document if too few sentences remain."""
        lines = [split_sentences(line) for line in doc.text.split("\n")]
        flat = [(li, si) for li, sents in enumerate(lines) for si in range(len(sents))]
        sentences = [lines[li][si] for li, si in flat]
        remove: set[int] = set()
        for start in range(len(sentences) - self.span + 1):
            key = _span_key(sentences[start : start + self.span])
            if key in self.seen:
                remove.update(range(start, start + self.span))
            else:
                self.seen.add(key)
        if not remove:
            return True
        self.stat_update("sentences_removed", value=len(remove))
        kept_lines: list[list[str]] = [[] for _ in lines]
        for index, (li, si) in enumerate(flat):
            if index not in remove:
                kept_lines[li].append(lines[li][si])
        if len(sentences) - len(remove) < self.min_sentences:
            return False, "duplicate_spans"
        doc.text = "\n".join(" ".join(sents) for sents in kept_lines if sents)
        return True


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """Readers (JSONL with a ``text`` field, and WET/WARC) + C4 cleaning, span dedup, language ID."""
    from ..common import LanguageFilter
    from ..readers import JsonlReader, WarcReader

    opts = resolve_options(DEFAULTS, options, name)
    common = {"rejects_dir": rejects_dir, "name": name}
    warc = WarcReader(inputs, **common)
    warc.reject_step = "reader_warc"
    steps: list[PipelineStep] = [JsonlReader(inputs, **common), warc, C4LineFilter(opts, **common)]
    if opts["span_dedup"]:
        steps.append(SentenceSpanDedup(opts, **common))
    if opts["language_id"]:
        steps.append(LanguageFilter(list(opts["languages"]), float(opts["language_threshold"]), step="language",
                                    **common))
    return steps
