"""``sweep.json``: what a sweep ran, one entry per (budget, size), read and written here only.

The file is rewritten whole after every run (write to a temporary file, fsync, rename), so a
sweep killed at any moment leaves either the previous or the new version, never half of one::

    {"version": 1, "config": "configs/pretrain/cpu-shakespeare.toml", "overrides": [...],
     "budgets": [1e12, ...], "sizes": [{"name": "64x2", "dim": 64, ...}, ...],
     "task": {"name": "arc_challenge", "limit": 200, "shots": 0} | null,
     "runs": [{"budget": 1e12, "size": "64x2", "run_dir": "c1e12/64x2", "status": "done",
               "shape": {...}, "params": ..., "params_matmul": ..., "flops_per_token": ...,
               "tokens_budget": ..., "steps": ..., "batch_tokens": ..., "seq_len": ..., "epochs": ...,
               "tokens": ..., "flops": ..., "val_loss": ..., "train_loss": ..., "nll": ..., "acc": ...,
               "acc_raw": ..., "chance": ..., "n": ..., "train_wall_s": ..., "eval_wall_s": ...,
               "wall_s": ..., "config_sha256": "..."}, ...]}

``status`` is "pending" (planned), "running" (started, not finished: the next sweep resumes
it) or "done". ``run_dir`` is relative to the folder of sweep.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from llamalab.fsutil import fsync_path

__all__ = ["SWEEP_FILE", "ScalingError", "load_runs", "read_sweep", "write_json_atomic"]

SWEEP_FILE = "sweep.json"
VERSION = 1


class ScalingError(ValueError):
    """Bad input to a sweep or a fit: one line naming the file or field and what was expected."""


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file and a rename (durable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sweep document at ``path`` (a sweep.json, or a folder holding one); ScalingError if unreadable."""
    p = Path(path)
    if p.is_dir():
        p = p / SWEEP_FILE
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        where = f"{path}: no {SWEEP_FILE} there" if Path(path).is_dir() else f"{p}: no such file"
        raise ScalingError(f"{where}; expected a sweep folder or a sweep.json (llamalab scaling sweep)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ScalingError(f"{p}: not valid JSON ({e}); expected a sweep.json written by llamalab scaling sweep") \
            from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
        raise ScalingError(f"{p}: expected a JSON object with a 'runs' list (a sweep.json)")
    if doc.get("version", VERSION) != VERSION:
        raise ScalingError(f"{p}: version {doc.get('version')!r}; this llamalab reads version {VERSION}")
    return doc


def _number(run: dict[str, Any], key: str, where: str, *, positive: bool = True, optional: bool = False
            ) -> float | None:
    value = run.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        kind = "a positive number" if positive else "a number"
        raise ScalingError(f"{where}.{key}: expected {kind}, got {value!r}")
    return float(value)


def load_runs(paths: list[str | os.PathLike[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished runs of every sweep in ``paths`` (folders or sweep.json files), checked field by
    field, and notes on the runs left out (not finished). Each run gets ``source``: "FILE:runs[i]"."""
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in paths:
        doc = read_sweep(path)
        file = str(Path(path) / SWEEP_FILE) if Path(path).is_dir() else str(path)
        unfinished = 0
        for i, run in enumerate(doc["runs"]):
            where = f"{file}: runs[{i}]"
            if not isinstance(run, dict):
                raise ScalingError(f"{where}: expected an object, got {type(run).__name__}")
            if run.get("status", "done") != "done":
                unfinished += 1
                continue
            out = {"source": where, "size": str(run.get("size", f"run {i}"))}
            for key in ("budget", "tokens", "params", "val_loss"):
                out[key] = _number(run, key, where)
            for key in ("flops_per_token", "params_matmul", "wall_s", "train_loss", "nll", "acc", "chance", "n"):
                value = _number(run, key, where, positive=key not in ("acc", "chance", "train_loss"), optional=True)
                if value is not None:
                    out[key] = value
            if out.get("acc") is not None and not 0 <= out["acc"] <= 1:
                raise ScalingError(f"{where}.acc: expected an accuracy in [0, 1], got {out['acc']!r}")
            runs.append(out)
        if unfinished:
            notes.append(f"{file}: {unfinished} run(s) not finished, left out (rerun the sweep to finish them)")
    return runs, notes
