"""Results files: the JSON a run writes, its markdown table, and two runs side by side.

The JSON holds ``model`` and ``config`` (what was run and how: shots, limit, seed, dtype,
batch size, context length), ``results`` (one row per task and metric: task, metric, value,
stderr, n, details) and ``failures`` (tasks that could not run, with the reason: the run goes
on). Accuracies are fractions in [0, 1]; the markdown shows them as percentages.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamalab.eval.base import TaskResult
from llamalab.fsutil import fsync_path

__all__ = ["compare_markdown", "load_results", "markdown_table", "new_run", "write_results"]

FORMAT_VERSION = 1
_PERCENT_METRICS = ("acc", "exact_match", "pass@", "f1", "em")


def new_run(model: str, config: dict[str, Any]) -> dict[str, Any]:
    """An empty results document for ``model`` run with ``config``."""
    return {"format": "llamalab-eval", "version": FORMAT_VERSION, "model": model, "config": config,
            "results": [], "failures": [], "timings_s": {}}


def add_rows(doc: dict[str, Any], rows: Sequence[TaskResult]) -> None:
    """Append result rows to ``doc``."""
    doc["results"].extend(r.to_dict() for r in rows)


def write_results(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results JSON written by ``llamalab eval``; ValueError naming the file if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.get("format") != "llamalab-eval" or not isinstance(doc.get("results"), list):
        raise ValueError(f"{path}: not a llamalab eval results file (expected an object with "
                         f"\"format\": \"llamalab-eval\" and a \"results\" list)")
    for i, row in enumerate(doc["results"]):
        missing = [k for k in ("task", "metric", "value", "n") if k not in row]
        if missing:
            raise ValueError(f"{path}: results[{i}] lacks {', '.join(missing)}")
    return doc


def _is_fraction(metric: str) -> bool:
    return metric.startswith(_PERCENT_METRICS)


def format_value(metric: str, value: float | None) -> str:
    """A metric value for a table: accuracies as percentages with one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if _is_fraction(metric) else f"{value:.4g}"


def _is_subtask(row: dict[str, Any]) -> bool:
    """Per-subject rows (MMLU's 57) go to their own table; categories stay in the main one."""
    return "category" in row.get("details", {})


def markdown_table(doc: dict[str, Any], *, subtasks: bool = True) -> str:
    """The results as markdown: a main table (LLaMA's headline metric in bold), per-subject rows after."""
    config = doc.get("config", {})
    lines = [f"Model: `{doc.get('model')}`; " + ", ".join(f"{k}={v}" for k, v in config.items()), ""]
    lines += ["| Task | Metric | Value | ± stderr | n | Shots | Source |", "|---|---|---:|---:|---:|---:|---|"]
    main = [r for r in doc["results"] if not _is_subtask(r)]
    for r in main:
        d = r.get("details", {})
        metric = f"**{r['metric']}**" if d.get("headline") else r["metric"]
        value = format_value(r["metric"], r["value"])
        value = f"**{value}**" if d.get("headline") else value
        lines.append(f"| {r['task']} | {metric} | {value} | {format_value(r['metric'], r.get('stderr'))} | "
                     f"{r['n']} | {d.get('shots', '')} | {d.get('source', '')} |")
    sub = [r for r in doc["results"] if _is_subtask(r) and r.get("details", {}).get("headline")]
    if subtasks and sub:
        lines += ["", "| Subject | Category | Metric | Value | ± stderr | n |", "|---|---|---|---:|---:|---:|"]
        for r in sub:
            lines.append(f"| {r['task']} | {r['details']['category']} | {r['metric']} | "
                         f"{format_value(r['metric'], r['value'])} | {format_value(r['metric'], r.get('stderr'))} | "
                         f"{r['n']} |")
    failures = doc.get("failures") or []
    if failures:
        lines += ["", "Failures:", ""] + [f"- `{f['task']}`: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def compare_markdown(a: dict[str, Any], b: dict[str, Any], *, subtasks: bool = False) -> str:
    """Two runs side by side, with B - A per (task, metric); rows only one run has show "-"."""
    def index(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["task"], r["metric"]): r for r in doc["results"] if subtasks or not _is_subtask(r)}

    ia, ib = index(a), index(b)
    keys = list(ia) + [k for k in ib if k not in ia]
    name_a, name_b = str(a.get("model")), str(b.get("model"))
    lines = [f"A: `{name_a}` ({_config_line(a)})", f"B: `{name_b}` ({_config_line(b)})", "",
             "| Task | Metric | A | B | B - A | n (A/B) |", "|---|---|---:|---:|---:|---|"]
    for task, metric in keys:
        ra, rb = ia.get((task, metric)), ib.get((task, metric))
        va = format_value(metric, ra["value"]) if ra else "-"
        vb = format_value(metric, rb["value"]) if rb else "-"
        diff = "-"
        if ra and rb and ra["value"] is not None and rb["value"] is not None:
            delta = rb["value"] - ra["value"]
            diff = f"{100 * delta:+.1f}" if _is_fraction(metric) else f"{delta:+.4g}"
        n = f"{ra['n'] if ra else '-'}/{rb['n'] if rb else '-'}"
        lines.append(f"| {task} | {metric} | {va} | {vb} | {diff} | {n} |")
    return "\n".join(lines) + "\n"


def _config_line(doc: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in doc.get("config", {}).items())
