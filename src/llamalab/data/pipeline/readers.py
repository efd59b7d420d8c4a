"""Readers of raw input: JSONL, WET/WARC and plain text, each bad record counted and rejected.

All build on `SourceReader` (``sources/__init__.py``): input files are split among the tasks by
rank, and a file that breaks mid-way (truncated gzip/bz2, bad encoding) keeps the documents read
so far and is written to the rejects file with the error. Inside a file, a malformed JSON line or
a record without text is rejected alone and reading goes on.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

from datatrove.data import Document

from .sources import SourceReader, list_input_files, open_binary, open_text

__all__ = ["JsonlReader", "TextReader", "WarcReader", "html_to_text"]


class JsonlReader(SourceReader):
    """One document per JSON line: ``text_field`` (default ``text``), ``id`` and the rest as metadata.

    ``.jsonl`` / ``.json`` files, optionally ``.gz`` / ``.bz2`` / ``.xz``. ``shard=False`` makes every
    task read every file (the global dedup stage partitions by hash instead of by file).
    """

    name = "📖 JSONL"

    def __init__(self, inputs: list[str], *, text_field: str = "text", id_field: str = "id",
                 shard: bool = True, rejects_dir: str | None = None, name: str = "source") -> None:
        super().__init__(inputs, rejects_dir=rejects_dir, name=name)
        self.text_field, self.id_field, self.shard = text_field, id_field, shard

    def units(self) -> list[str]:
        """The JSONL files of the inputs."""
        return list_input_files(self.inputs, (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.bz2",
                                              ".jsonl.xz"))

    def run(self, data=None, rank: int = 0, world_size: int = 1):  # noqa: ANN001, ANN201 - datatrove's signature
        """Read this task's files (all files when ``shard`` is off)."""
        if not self.shard:
            rank, world_size = 0, 1
        yield from super().run(data, rank, world_size)

    def read_unit(self, unit: str) -> Iterator[Document]:
        """Yield the documents of one JSONL file; malformed lines become rejects."""
        with open_binary(unit) as f:  # bytes, so that one badly encoded line is rejected alone
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{unit}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.reject_record(Document(text="", id=where, metadata={
                        "line": raw[:1000].decode("utf-8", errors="replace"), "error": str(e)}), "bad_encoding")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    self.reject_record(Document(text="", id=where, metadata={"line": line[:1000], "error": e.msg}),
                                       "malformed_json")
                    continue
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    self.reject_record(Document(text="", id=where, metadata={"line": line[:1000]}), "no_text")
                    continue
                metadata = dict(record.get("metadata") or {}) if isinstance(record.get("metadata"), dict) else {}
                metadata.update({k: v for k, v in record.items()
                                 if k not in (self.text_field, self.id_field, "metadata")})
                yield Document(text=text, id=str(record.get(self.id_field, where)), metadata=metadata)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, laid out as a browser would (inscriptis)."""
    from inscriptis import get_text

    return get_text(html).strip()


class WarcReader(SourceReader):
    """CommonCrawl WET files (``conversion`` records: text already) and WARC files (``response``
    records with HTML, turned into text), gzipped or not."""

    name = "📖 WARC/WET"

    def units(self) -> list[str]:
        """The WARC/WET files of the inputs."""
        return list_input_files(self.inputs, (".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet", ".warc.wet.gz"))

    def read_unit(self, unit: str) -> Iterator[Document]:
        """Yield one document per text-bearing record; a broken archive ends the file (a reject)."""
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        gzipped = unit.lower().endswith(".gz")
        # warcio reads gzip members itself (so the records before a damaged one are kept)...
        with open(unit, "rb") if gzipped else open_binary(unit) as f:
            try:
                for record in ArchiveIterator(f):
                    doc = self._document(record, unit)
                    if doc is not None:
                        yield doc
            except ArchiveLoadFailed as e:
                raise EOFError(f"{unit}: {e}") from None
        if gzipped:
            # ... but takes a truncated member for the end of the file: gzip itself tells them apart.
            with gzip.open(unit, "rb") as check:
                while check.read(1 << 20):
                    pass

    def _document(self, record: Any, unit: str) -> Document | None:
        kind = record.rec_type
        if kind not in ("conversion", "response"):
            return None
        headers = record.rec_headers
        url = headers.get_header("WARC-Target-URI") or ""
        rid = headers.get_header("WARC-Record-ID") or f"{unit}:{url}"
        payload = record.content_stream().read()
        if kind == "response":
            ctype = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
            if "html" not in ctype.lower():
                return None
            text = html_to_text(payload.decode("utf-8", errors="replace"))
        else:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                self.reject_record(Document(text="", id=rid, metadata={"url": url, "error": str(e)}), "bad_encoding")
                return None
        if not text.strip():
            self.reject_record(Document(text="", id=rid, metadata={"url": url}), "no_text")
            return None
        return Document(text=text, id=rid.strip("<>"), metadata={"url": url, "date": headers.get_header("WARC-Date"),
                                                                  "source_file": os.path.basename(unit)})


class TextReader(SourceReader):
    """Each ``.txt`` file (optionally compressed) is one document; its path relative to the input is the id."""

    name = "📖 Text"

    def units(self) -> list[str]:
        """The text files of the inputs."""
        return list_input_files(self.inputs, (".txt", ".txt.gz", ".txt.bz2", ".txt.xz"))

    def read_unit(self, unit: str) -> Iterator[Document]:
        """Yield the file as one document (UTF-8; a bad byte rejects the file)."""
        with open_text(unit) as f:
            text = f.read()
        if not text.strip():
            self.reject_record(Document(text="", id=unit, metadata={"source_file": unit}), "no_text")
            return
        yield Document(text=text, id=unit, metadata={"source_file": unit})
