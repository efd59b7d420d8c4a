"""``llamalab data report RUN_DIR``: documents in/out and drop reasons per source and step.

Reads datatrove's per-task stats (``RUN_DIR/logs/<source>/<stage>/stats/<rank>.json``), sums them
over tasks (so a resumed run counts every task once, whichever run did it), and adds the
mixture's tokens per source when ``RUN_DIR/mixture.json`` exists. `format_report` prints a
Markdown table; the same rows are written as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["collect_report", "format_report", "write_report"]

STAGES = ("process", "dedup")


def _value(v: Any) -> float:
    """A datatrove stat's count: a plain number, or the ``total`` of a metric."""
    if isinstance(v, dict):
        return v.get("total", 0)
    return v if isinstance(v, (int, float)) else 0


def _merge_tasks(files: Iterable[Path]) -> list[dict[str, Any]]:
    """Sum the per-task stats files of one stage, step by step."""
    steps: list[dict[str, Any]] = []
    for path in sorted(files):
        with path.open(encoding="utf-8") as f:
            tasks = json.load(f)
        for i, step in enumerate(tasks):
            if i == len(steps):
                steps.append({"name": step["name"], "stats": {}})
            totals = steps[i]["stats"]
            for key, value in step.get("stats", {}).items():
                totals[key] = totals.get(key, 0) + _value(value)
    return steps


def _row(source: str, stage: str, step: dict[str, Any]) -> dict[str, Any] | None:
    name, stats = step["name"], step["stats"]
    kind, _, title = name.partition(": ")
    if "WRITER" in kind:
        return None
    if "READER" in kind:
        docs_in, docs_out = None, stats.get("documents", 0)
    else:
        docs_in, docs_out = stats.get("total", 0), stats.get("forwarded", 0)
    reasons = {k.removeprefix("dropped_"): int(v) for k, v in sorted(stats.items()) if k.startswith("dropped_")}
    extra = {k: v for k, v in stats.items()
             if k not in ("total", "forwarded", "dropped", "documents", "doc_len", "doc_len_tokens")
             and not k.startswith("dropped_")}
    return {"source": source, "stage": stage, "kind": "reader" if "READER" in kind else "filter",
            "step": title or name, "in": docs_in, "out": int(docs_out),
            "dropped": int(stats.get("dropped", 0)), "reasons": reasons,
            "chars_out": int(stats.get("doc_len", 0)), "other": extra}


def collect_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The report of a run directory: ``{"steps": [rows], "mixture": {...} | None}``."""
    run_dir = Path(run_dir)
    logs = run_dir / "logs"
    if not logs.is_dir():
        raise FileNotFoundError(f"{run_dir}: no logs/ directory; expected the run_dir of `llamalab data run`")
    rows: list[dict[str, Any]] = []
    incomplete: dict[str, int] = {}
    for source_dir in sorted(p for p in logs.iterdir() if p.is_dir()):
        for stage in STAGES:
            stage_dir = source_dir / stage
            if not stage_dir.is_dir():
                continue
            for step in _merge_tasks((stage_dir / "stats").glob("*.json")):
                row = _row(source_dir.name, stage, step)
                if row is not None:
                    rows.append(row)
            executor = stage_dir / "executor.json"
            if executor.is_file():
                tasks = json.loads(executor.read_text()).get("world_size", 0)
                done = len(list((stage_dir / "completions").glob("*"))) if (stage_dir / "completions").is_dir() else 0
                if done < tasks:
                    incomplete[f"{source_dir.name}/{stage}"] = tasks - done
    mixture = None
    if (run_dir / "mixture.json").is_file():
        mixture = json.loads((run_dir / "mixture.json").read_text())
    return {"run_dir": str(run_dir), "steps": rows, "incomplete_tasks": incomplete, "mixture": mixture}


def _n(x: Any) -> str:
    return "" if x is None else f"{int(x):,}"


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables: steps per source, then the mixture's tokens per source.

    The dedup stage's reader row is left out of the table (it re-reads stage 1's output); the
    JSON keeps every row.
    """
    lines = ["| source | stage | step | docs in | docs out | dropped | drop reasons |",
             "|---|---|---|--:|--:|--:|---|"]
    for r in report["steps"]:
        if r["stage"] == "dedup" and r["kind"] == "reader":
            continue  # it reads stage 1's output: the row above already counts those documents
        reasons = ", ".join(f"{k} {v:,}" for k, v in r["reasons"].items())
        lines.append(f"| {r['source']} | {r['stage']} | {r['step']} | {_n(r['in'])} | {_n(r['out'])} | "
                     f"{_n(r['dropped'])} | {reasons} |")
    for name, missing in report.get("incomplete_tasks", {}).items():
        lines.append(f"\n{name}: {missing} task(s) not completed yet (re-run to resume)")
    mix = report.get("mixture")
    if mix:
        lines += ["", "| source | documents | tokens | share of tokens | loader weight | epochs |",
                  "|---|--:|--:|--:|--:|--:|"]
        total = sum(s["tokens"] for s in mix["sources"].values()) or 1
        for name, s in mix["sources"].items():
            lines.append(f"| {name} | {s['documents']:,} | {s['tokens']:,} | {100 * s['tokens'] / total:.1f}% | "
                         f"{100 * s['weight']:.1f}% | {s['epochs']:.2f} |")
        lines.append(f"| total | {sum(s['documents'] for s in mix['sources'].values()):,} | {total:,} | 100% | | |")
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike[str], json_path: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """Collect the report, write it as JSON (default ``RUN_DIR/report.json``); return (table, json path)."""
    report = collect_report(run_dir)
    path = Path(json_path) if json_path else Path(run_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return format_report(report), path
