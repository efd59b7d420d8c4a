"""What the benchmark scripts share: one measurement in a fresh process.

Each script re-runs itself with ``--child SPEC_JSON``; the child prints its figures as JSON on
its last line of stdout. A fresh process per measurement keeps one implementation's allocator,
thread pools and caches from warming or slowing the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(script: str, spec: dict, *, threads: int, label: str | None = None,
              env: dict[str, str] | None = None) -> dict:
    """Run ``script --child SPEC`` with ``threads`` OpenMP threads and llamalab's ``src`` on the
    path; return the JSON of its last stdout line, or exit with its stderr's tail."""
    full = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=full,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label or spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
