"""The pieces every data source shares, and helpers the per-source tests use.

`run_local` runs a source's steps plus a JsonlWriter on datatrove's LocalPipelineExecutor and
returns the written documents, the merged stats and the rejects, as the engine would.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from datatrove.data import Document

from llamalab.data.pipeline.sources import (
    SourceFilter,
    SourceReader,
    list_input_files,
    rank_shard,
    resolve_options,
)


def read_jsonl_dir(folder: Path) -> list[dict[str, Any]]:
    """All records of the .jsonl / .jsonl.gz files under ``folder``, in file-name order."""
    records: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def step_stats(stats: list[dict[str, Any]], step_name: str) -> dict[str, int]:
    """The counters of the step whose name contains ``step_name``, as ``{stat: total}``."""
    for entry in stats:
        if step_name in entry["name"]:
            return {k: (v["total"] if isinstance(v, dict) else v) for k, v in entry["stats"].items()}
    raise KeyError(f"no step named like {step_name!r} in {[e['name'] for e in stats]}")


def run_local(steps: list, tmp_path: Path, *, tasks: int = 1, workers: int = 1) -> dict[str, Any]:
    """Run ``steps`` + a JsonlWriter on LocalPipelineExecutor; return docs, stats and rejects."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.writers import JsonlWriter

    out = tmp_path / "output"
    executor = LocalPipelineExecutor(
        pipeline=[*steps, JsonlWriter(str(out), compression=None)],
        tasks=tasks,
        workers=workers,
        logging_dir=str(tmp_path / "logs"),
    )
    executor.run()
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    return {
        "docs": read_jsonl_dir(out) if out.exists() else [],
        "stats": stats,
        "rejects": read_jsonl_dir(tmp_path / "rejects") if (tmp_path / "rejects").exists() else [],
    }


def run_steps(steps: list, docs: list[Document] | None = None) -> list[Document]:
    """Chain steps in this process (rank 0 of 1) and return the documents that come out."""
    data = iter(docs) if docs is not None else None
    for step in steps:
        data = step(data, 0, 1)
    return list(data)


def test_resolve_options_rejects_unknown_key() -> None:
    defaults = {"a": 1, "b": 2}
    assert resolve_options(defaults, {"b": 3}, "wiki") == {"a": 1, "b": 3}
    with pytest.raises(ValueError, match=r"'wiki'.*unknown option\(s\) c"):
        resolve_options(defaults, {"c": 1}, "wiki")


def test_rank_shard_covers_every_unit_once() -> None:
    units = [f"f{i}" for i in range(7)]
    shards = [rank_shard(units, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == units
    assert shards[0] == ["f0", "f3", "f6"]


def test_list_input_files_walks_and_names_missing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    (tmp_path / "b.xml").write_text("y")
    assert list_input_files([str(tmp_path)], (".txt",)) == [str(tmp_path / "a" / "x.txt")]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_input_files([str(tmp_path / "nope")])


class _LinesReader(SourceReader):
    name = "lines"

    def read_unit(self, unit: str):
        with gzip.open(unit, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                yield Document(text=line.strip(), id=f"{unit}:{i}")


class _ShortFilter(SourceFilter):
    name = "short"

    def filter(self, doc: Document):
        return (len(doc.text) >= 3) or (False, "too_short")


def test_truncated_archive_is_a_reject_and_the_run_goes_on(tmp_path: Path) -> None:
    good = tmp_path / "in" / "a.gz"
    good.parent.mkdir()
    good.write_bytes(gzip.compress(b"alpha\nbe\ngamma\n"))
    data = gzip.compress(("line\n" * 5000).encode())
    (tmp_path / "in" / "b.gz").write_bytes(data[: len(data) // 2])  # cut mid-stream
    rejects = str(tmp_path / "rejects")
    result = run_local(
        [_LinesReader([str(tmp_path / "in")], rejects_dir=rejects, name="t"),
         _ShortFilter(rejects_dir=rejects, name="t", step="short")],
        tmp_path,
    )
    texts = [d["text"] for d in result["docs"]]
    assert texts[:2] == ["alpha", "gamma"]
    reader = step_stats(result["stats"], "lines")
    assert reader["dropped_truncated_or_corrupt_archive"] == 1
    reasons = {r["metadata"]["filter_reason"] for r in result["rejects"]}
    assert reasons == {"truncated_or_corrupt_archive", "too_short"}
    assert step_stats(result["stats"], "short")["dropped_too_short"] == 1


@pytest.mark.parametrize("source", ["c4", "github", "wikipedia", "books", "arxiv", "stackexchange"])
def test_source_contract(source: str, tmp_path: Path) -> None:
    """Every source module: DEFAULTS, build_steps -> reader first, no writer; unknown options named."""
    import importlib

    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.writers.disk_base import DiskWriter

    module = importlib.import_module(f"llamalab.data.pipeline.sources.{source}")
    assert isinstance(module.DEFAULTS, dict) and module.DEFAULTS
    steps = module.build_steps([str(tmp_path)], {}, rejects_dir=None, name=source)
    assert steps and all(isinstance(s, PipelineStep) for s in steps)
    assert isinstance(steps[0], SourceReader)
    assert not any(isinstance(s, DiskWriter) for s in steps)
    with pytest.raises(ValueError, match="no_such_threshold"):
        module.build_steps([str(tmp_path)], {"no_such_threshold": 1}, rejects_dir=None, name=source)
