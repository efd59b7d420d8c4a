"""Books: Gutenberg-style plain-text books, licence boilerplate removed, near-duplicates removed.

Input: ``.txt`` files (optionally compressed), one book each, read by the engine's ``TextReader``.
Steps after it:

1. ``BookDedup``: MinHash LSH (``datasketch``) over word 5-gram shingles of the book's body
   (Gutenberg boilerplate excluded); a book whose estimated Jaccard similarity with an already
   kept book is >= 0.9 is dropped (``near_duplicate``, with ``metadata["duplicate_of"]``). Books
   are visited in file-name order, so the first of each cluster is the one kept.
2. ``GutenbergStrip``: keep only the text between the ``*** START OF THE PROJECT GUTENBERG EBOOK``
   and ``*** END OF ...`` markers (and the older "SMALL PRINT" / "End of the Project Gutenberg
   EBook" forms); a file without markers is kept whole.

Scope of the dedup: every task reads every book (``SourceReader.read_every_unit``) and clusters
them all identically, then passes on only the books of the files it owns: the result is global
and the same for any number of tasks, at the price of each task computing every signature. Book
corpora are small in documents (tens of thousands), which is what makes this affordable; at a
larger scale datatrove's multi-stage MinHash pipeline is the tool.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from . import FOREIGN, SourceFilter, resolve_options

DEFAULTS: dict[str, Any] = {
    "strip_gutenberg": True,
    "dedup": True,
    "jaccard_threshold": 0.9,
    "num_perm": 128,
    "shingle_words": 5,
    "seed": 1,
    "min_chars": 1,
}

_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG E-?BOOK.*$"
    r"|^\s*\*END\*THE SMALL PRINT!.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK.*$"
    r"|^\s*End of (the )?Project Gutenberg'?s? .*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """The book's text between Gutenberg's START and END markers, and whether a marker was found."""
    found = False
    start = None
    for start in _START.finditer(text):
        pass  # the last START marker: some files repeat the header
    if start is not None:
        text, found = text[start.end():], True
    end = _END.search(text)
    if end is not None:
        text, found = text[: end.start()], True
    return text.strip("\n\r\ufeff ").rstrip(), found


def shingles(text: str, n: int) -> set[bytes]:
    """Word ``n``-grams of the lowercased text (punctuation kept with its word), as bytes."""
    words = text.lower().split()
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class GutenbergStrip(SourceFilter):
    """Remove the Project Gutenberg header and footer (``empty_after_boilerplate`` if nothing is left)."""

    name = "📜 Gutenberg boilerplate"

    def __init__(self, min_chars: int = 1, **kwargs: Any):
        super().__init__(step="gutenberg", **kwargs)
        self.min_chars = min_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Replace the text by the book's body."""
        text, found = strip_gutenberg(doc.text)
        doc.metadata["gutenberg_markers"] = found
        if len(text) < self.min_chars:
            return False, "empty_after_boilerplate"
        doc.text = text
        return True


class BookDedup(SourceFilter):
    """Book-level near-duplicate removal with MinHash LSH (see the module docstring for its scope)."""

    name = "📚 Book MinHash dedup"

    def __init__(self, options: dict[str, Any], **kwargs: Any):
        super().__init__(step="book_dedup", **kwargs)
        self.threshold = float(options["jaccard_threshold"])
        self.num_perm = int(options["num_perm"])
        self.shingle_words = int(options["shingle_words"])
        self.seed = int(options["seed"])
        self.strip = bool(options["strip_gutenberg"])  # signatures of the book's body, not its licence

    def minhash(self, text: str) -> Any:
        """The MinHash signature of a book's shingles."""
        from datasketch import MinHash

        signature = MinHash(num_perm=self.num_perm, seed=self.seed)
        signature.update_batch(list(shingles(text, self.shingle_words)))
        return signature

    def _clustered(self, data: DocumentsPipeline) -> Iterator[Document]:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        kept: dict[str, Any] = {}
        for doc in data:
            body = strip_gutenberg(doc.text)[0] if self.strip else doc.text
            signature = self.minhash(body)
            matches = sorted(k for k in lsh.query(signature) if kept[k].jaccard(signature) >= self.threshold)
            if matches:
                doc.metadata["duplicate_of"] = matches[0]
                doc.metadata["jaccard"] = round(kept[matches[0]].jaccard(signature), 4)
            else:
                lsh.insert(doc.id, signature)
                kept[doc.id] = signature
            if not doc.metadata.pop(FOREIGN, False):
                yield doc

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Cluster every book (all ranks read all of them); filter and count only this rank's own."""
        yield from super().run(self._clustered(data), rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Drop the books marked as near-duplicates of an earlier one."""
        if "duplicate_of" in doc.metadata:
            return False, "near_duplicate"
        return True


def build_steps(
    inputs: list[str], options: dict[str, Any], *, rejects_dir: str | None, name: str
) -> list[PipelineStep]:
    """Text reader + MinHash LSH book dedup + Gutenberg boilerplate removal."""
    from ..readers import TextReader

    opts = resolve_options(DEFAULTS, options, name)
    common = {"rejects_dir": rejects_dir, "name": name}
    reader = TextReader(inputs, **common)
    steps: list[PipelineStep] = [reader]
    if opts["dedup"]:
        reader.read_every_unit = True  # the clustering must see every book; BookDedup emits this rank's
        steps.append(BookDedup(opts, **common))
    if opts["strip_gutenberg"]:
        steps.append(GutenbergStrip(int(opts["min_chars"]), **common))
    return steps
