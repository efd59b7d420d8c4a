"""Per-source steps of the data pipeline: one module per LLaMA source.

Each module ``llamalab.data.pipeline.sources.<type>`` exposes

- ``DEFAULTS``: every threshold of that source, with the recipe's defaults, and
- ``build_steps(inputs, options, *, rejects_dir, name)``: the reader followed by the source's
  filters and transforms (datatrove ``PipelineStep`` s), without the final writer.

This package also holds the small pieces the source modules share: option checking, input
listing and rank sharding, a reader base class that turns bad input into rejects instead of
crashes, and a filter base class whose drops carry a reason in datatrove's stats and rejects file.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tarfile
import zlib
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from xml.etree.ElementTree import ParseError

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter

# Metadata key of a document read by a rank that does not own its unit (``read_every_unit``).
FOREIGN = "_foreign_unit"

SOURCE_TYPES = ("commoncrawl", "c4", "github", "wikipedia", "books", "arxiv", "stackexchange")

# Errors that mean "this input is bad", never "this code is wrong": they become rejects.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    UnicodeDecodeError,
    ParseError,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    json.JSONDecodeError,
    gzip.BadGzipFile,
)


def resolve_options(defaults: dict[str, Any], options: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """Return ``defaults`` overridden by ``options``; an unknown key is a ValueError naming it."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"source {source!r}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **options}


def list_input_files(inputs: Iterable[str], suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Expand files and directories (walked recursively) into a sorted list of files.

    ``suffixes`` keeps only names ending in one of them. A missing input is an OSError naming it.
    The list is sorted so every worker of an executor computes the same one before sharding.
    """
    found: set[str] = set()
    for item in inputs:
        if os.path.isdir(item):
            for root, _dirs, files in os.walk(item):
                for fname in files:
                    found.add(os.path.join(root, fname))
        elif os.path.exists(item):
            found.add(item)
        else:
            raise FileNotFoundError(f"input {item!r} does not exist")
    files = sorted(found)
    if suffixes is not None:
        files = [f for f in files if f.lower().endswith(suffixes)]
    return files


def list_units(inputs: Iterable[str], is_unit_dir: Callable[[str], bool], file_suffixes: tuple[str, ...]) -> list[str]:
    """Work units made of directories: an input directory for which ``is_unit_dir`` holds is one
    unit (a repository, a paper); any other input directory is a folder of units (its sub-
    directories and its files ending in ``file_suffixes``); an input file is a unit. Sorted."""
    units: set[str] = set()
    for item in inputs:
        if not os.path.isdir(item):
            units.update(list_input_files([item]))
        elif is_unit_dir(item):
            units.add(item)
        else:
            units.update(e.path for e in os.scandir(item) if e.is_dir() or e.name.endswith(file_suffixes))
    return sorted(units)


def rank_shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """The items this task reads: every ``world_size``-th item starting at ``rank``."""
    return items[rank::world_size]


def open_text(path: str, encoding: str = "utf-8", errors: str = "strict"):
    """Open a text file, decompressing .gz / .bz2 / .xz by extension."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, errors=errors)
    if lower.endswith(".bz2"):
        return bz2.open(path, "rt", encoding=encoding, errors=errors)
    if lower.endswith(".xz"):
        return lzma.open(path, "rt", encoding=encoding, errors=errors)
    return open(path, encoding=encoding, errors=errors)


def open_binary(path: str):
    """Open a file for reading bytes, decompressing .gz / .bz2 / .xz by extension."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".bz2"):
        return bz2.open(path, "rb")
    if lower.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def rejects_writer(rejects_dir: str | None, name: str, step: str) -> JsonlWriter | None:
    """A JSONL writer for one step's rejects (``REJECTS/<name>/<step>/<rank>.jsonl``), or None."""
    if not rejects_dir:
        return None
    return JsonlWriter(rejects_dir, output_filename=f"{name}/{step}/${{rank}}.jsonl", compression=None)


class SourceFilter(BaseFilter):
    """A datatrove filter that may also rewrite the text it keeps.

    Subclasses implement ``filter`` returning True (keep, possibly after editing ``doc.text``)
    or ``(False, reason)``; datatrove counts ``dropped_<reason>`` and the rejects writer gets the
    document with ``metadata["filter_reason"]``.
    """

    type = "🔻 - FILTER"

    def __init__(self, *, rejects_dir: str | None = None, name: str = "source", step: str | None = None):
        super().__init__(exclusion_writer=rejects_writer(rejects_dir, name, step or type(self).__name__))


class SourceReader(PipelineStep):
    """Base reader: lists its work units, shards them by rank, and rejects bad input.

    Subclasses implement ``read_unit(unit)`` yielding Documents. An exception from
    ``BAD_INPUT_ERRORS`` while reading a unit (truncated archive, malformed XML, bad encoding)
    ends that unit: the documents already yielded stay, the unit is counted as
    ``dropped_<reason>`` and written to the rejects file with the error, and the run goes on.
    """

    type = "📖 - READER"
    # The rejects sub-folder: two readers in one pipeline (e.g. JSONL then WET) need different ones.
    reject_step = "reader"
    # Read every rank's units, marking the others' documents as FOREIGN (see ``run``).
    read_every_unit = False

    def __init__(self, inputs: list[str], *, rejects_dir: str | None = None, name: str = "source"):
        super().__init__()
        self.inputs = list(inputs)
        self.rejects_dir = rejects_dir
        self.source_name = name

    def units(self) -> list[str]:
        """The work units (files by default), in an order every rank agrees on."""
        return list_input_files(self.inputs)

    @abstractmethod
    def read_unit(self, unit: str) -> Iterator[Document]:
        """Yield the documents of one work unit."""

    def reject_reason(self, error: BaseException) -> str:
        """The stat name for a unit that failed with ``error``."""
        if isinstance(error, ParseError):
            return "malformed_xml"
        if isinstance(error, UnicodeDecodeError):
            return "bad_encoding"
        if isinstance(error, json.JSONDecodeError):
            return "malformed_json"
        if isinstance(error, EOFError | zlib.error | lzma.LZMAError | gzip.BadGzipFile | tarfile.TarError):
            return "truncated_or_corrupt_archive"
        return "unreadable_input"

    def reject(self, writer: JsonlWriter | None, rank: int, doc: Document, reason: str) -> None:
        """Count a dropped record and write it (with the reason) to the rejects file."""
        self.stat_update("dropped", f"dropped_{reason}")
        if writer is not None:
            doc.metadata["filter_reason"] = reason
            writer.write(doc, rank)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Read this rank's share of the units, yielding their documents.

        With ``read_every_unit`` the other ranks' units are read too, their documents marked with
        ``metadata[FOREIGN]`` and neither counted nor rejected here (their owner does that): a
        later step that must see everything (book-level dedup) then emits only this rank's share.
        """
        if data:
            yield from data
        writer = rejects_writer(self.rejects_dir, self.source_name, self.reject_step)
        self._writer, self._rank = writer, rank
        try:
            for index, unit in enumerate(self.units()):
                self._owned = index % world_size == rank  # the same split as rank_shard
                if not (self._owned or self.read_every_unit):
                    continue
                if self._owned:
                    self.stat_update("input_units")
                try:
                    for doc in self.read_unit(unit):
                        if self._owned:
                            self.stat_update("documents")
                            self.update_doc_stats(doc)
                        else:
                            doc.metadata[FOREIGN] = True
                        yield doc
                except BAD_INPUT_ERRORS as error:
                    if self._owned:
                        reason = self.reject_reason(error)
                        bad = Document(text="", id=str(unit), metadata={"source_file": str(unit), "error": repr(error)})
                        self.reject(writer, rank, bad, reason)
        finally:
            if writer is not None:
                writer.close()

    def reject_record(self, doc: Document, reason: str) -> None:
        """Reject one record inside a unit (e.g. a malformed post) while reading goes on."""
        if getattr(self, "_owned", True):
            self.reject(getattr(self, "_writer", None), getattr(self, "_rank", 0), doc, reason)
