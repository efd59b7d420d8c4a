"""Reading the text inputs every stage takes: JSONL files of ``{"text": ...}`` records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["iter_jsonl_texts", "read_documents"]


def iter_jsonl_texts(path: Path, field: str = "text", error: type[Exception] = ValueError) -> Iterator[str]:
    """The string ``field`` of each line of a JSONL file (blank lines skipped), streamed.

    A line that is not a JSON object with a string ``field`` raises ``error`` naming ``file:line``.
    """
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object "
                            f"per line") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{lineno}: a JSON {type(record).__name__}; expected an object with a "
                            f"{field!r} field")
            text = record.get(field)
            if not isinstance(text, str):
                raise error(f"{path}:{lineno}: expected a string {field!r} field, found "
                            f"{'none' if text is None else type(text).__name__}")
            yield text


def read_documents(path: str | Path, what: str = "a .txt or .jsonl file") -> list[str]:
    """A file's documents: the whole of a text file, or each ``{"text": ...}`` line of a .jsonl file.

    A missing file is an OSError and non-UTF-8 text a ValueError, both naming the file and ``what``
    was expected of it.
    """
    path = Path(path)
    if not path.is_file():
        raise OSError(f"{path}: no such file (expected {what})")
    if path.suffix == ".jsonl":
        return list(iter_jsonl_texts(path))
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected {what}") from None
