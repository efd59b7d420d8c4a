"""`llamalab scaling sweep|fit`: Llama 3's IsoFLOPs method (§3.2.1) on the command line.

Parsing only: torch, numpy, scipy and matplotlib are imported inside the commands, so
``llamalab --help`` stays fast. Bad input raises :class:`~llamalab.scaling.records.ScalingError`
(a ValueError): the CLI prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_scaling_parser", "cmd_fit", "cmd_sweep", "parse_budgets"]

SCALING_EPILOG = """\
examples:
  llamalab scaling sweep --config configs/pretrain/cpu-shakespeare.toml --budgets 1e12,2e12,4e12 \\
      --sizes 32x1,64x2,96x2,128x3 --out runs/scaling
  llamalab scaling fit runs/scaling --out runs/scaling/fit

The method and its output files: docs/scaling.md.
"""

SWEEP_EPILOG = """\
examples:
  llamalab scaling sweep --config configs/pretrain/cpu-shakespeare.toml --budgets 1e12,2e12,4e12 \\
      --sizes 32x1,64x2,96x2,128x3 --out runs/scaling
  llamalab scaling sweep --config configs/pretrain/cpu-shakespeare.toml --budgets 1e12,2e12 --dry-run
  llamalab scaling sweep --config configs/pretrain/cpu-shakespeare.toml --budgets 1e12,2e12,4e12 \\
      --out runs/scaling --task arc_challenge --task-limit 200 optim.lr=2e-3

Per budget C and size, the run trains on C / FLOPs-per-token tokens (train/metrics.py's
6N + 12 L d T): train.total_steps = round(tokens / train.global_batch_tokens). Each run is
OUT/c<budget>/<size>; OUT/sweep.json is rewritten after every run. Running the same command
again skips finished runs and resumes interrupted ones; added budgets or sizes join the sweep.
Sizes: DIMxLAYERS (heads: one per 32 dims) or DIMxLAYERSxHEADS, on the "tiny" preset.
"""

FIT_EPILOG = """\
examples:
  llamalab scaling fit runs/scaling
  llamalab scaling fit runs/scaling runs/scaling-more/sweep.json --out runs/scaling/fit --confidence 0.9
  llamalab scaling fit runs/scaling --json

Writes OUT/fit.json, OUT/scaling-isoflops.png, OUT/scaling-power-law.png and, when the sweep
scored a task, OUT/scaling-nll-accuracy.png (OUT: --out, default the first sweep's folder).
"""


def parse_budgets(text: str) -> list[float]:
    """"1e12,2e12,4e12" -> [1e12, 2e12, 4e12]; ScalingError for anything but distinct positive numbers."""
    from llamalab.scaling.records import ScalingError

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ScalingError(f"--budgets: {item!r} is not a number; expected FLOPs such as 1e12,2e12,4e12") from None
        if not (math.isfinite(value) and value > 0):
            raise ScalingError(f"--budgets: {item!r}: expected a positive number of FLOPs")
        if any(f"{value:.6g}" == f"{v:.6g}" for v in out):
            raise ScalingError(f"--budgets: {item!r} is listed twice")
        out.append(value)
    if not out:
        raise ScalingError("--budgets: empty; expected compute budgets in FLOPs, e.g. 1e12,2e12,4e12")
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    """Plan the sweep and train its runs (``--dry-run``: print the plan only)."""
    from llamalab.scaling.records import ScalingError
    from llamalab.scaling.sizes import parse_sizes
    from llamalab.scaling.sweep import format_plan, plan_sweep, run_sweep

    budgets = parse_budgets(args.budgets)
    shapes = parse_sizes(args.sizes)
    if args.task_limit is not None and args.task_limit < 1:
        raise ScalingError(f"--task-limit {args.task_limit}: expected a number of questions >= 1")
    if args.task is None and (args.task_limit is not None or args.task_shots):
        raise ScalingError("--task-limit/--task-shots: give --task too (e.g. --task arc_challenge)")
    if args.dry_run:  # (the run folders shown under --out, or under runs/scaling)
        print(format_plan(plan_sweep(args.config, args.overrides, budgets, shapes, args.out or "runs/scaling")))
        return 0
    if args.out is None:
        raise ScalingError("--out DIR: the sweep folder is needed to train (only --dry-run goes without)")
    task = {"name": args.task, "limit": args.task_limit, "shots": args.task_shots} if args.task else None
    if args.threads is not None:
        if args.threads < 1:
            raise ScalingError(f"--threads {args.threads}: expected a number of threads >= 1")
        import torch

        torch.set_num_threads(args.threads)
    _doc, complete = run_sweep(args.config, args.overrides, budgets, shapes, args.out, task=task,
                               verbose=args.verbose, echo=lambda line: print(line, flush=True))
    if complete:
        print(f"done: llamalab scaling fit {args.out}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit the sweeps' runs; print the table (or JSON), write fit.json and the plots."""
    from llamalab.scaling.fit import fit_sweep, format_table
    from llamalab.scaling.plot import plot_fit
    from llamalab.scaling.records import load_runs, write_json_atomic

    runs, notes = load_runs(args.runs)
    doc = fit_sweep(runs, confidence=args.confidence)
    doc["inputs"] = [str(p) for p in args.runs]
    doc["notes"] = notes + doc["notes"]
    first = Path(args.runs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    write_json_atomic(out / "fit.json", doc)
    plots = plot_fit(doc, runs, out)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(format_table(doc))
        print(f"wrote {out / 'fit.json'}, " + ", ".join(str(p) for p in plots))
    for note in doc["downstream"]["notes"] if doc.get("downstream") else []:
        print(f"llamalab scaling fit: note: {note}", file=sys.stderr)
    return 0


def add_scaling_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``scaling`` and its actions ``sweep`` and ``fit`` to the ``llamalab`` sub-commands."""
    from llamalab.scaling.sizes import DEFAULT_SIZES

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("scaling", help="Llama 3's scaling-law method: IsoFLOPs sweeps and power-law fits",
                              formatter_class=fmt, epilog=SCALING_EPILOG,
                              description="Llama 3 (Dubey et al. 2024) §3.2.1: train a ladder of model sizes at "
                                          "each compute budget (sweep), then fit each budget's loss parabola, the "
                                          "power law of compute-optimal tokens against compute, and downstream "
                                          "NLL -> accuracy (fit).")
    sub = p.add_subparsers(dest="scaling_command", metavar="ACTION")

    s = sub.add_parser("sweep", help="train every (budget, size) of an IsoFLOPs sweep (resumable)",
                       formatter_class=fmt, epilog=SWEEP_EPILOG,
                       description="An IsoFLOPs sweep with the project's trainer: for each compute budget, each "
                                   "model size trains on the tokens the budget allows; the final validation loss "
                                   "(and, with --task, the NLL and accuracy on a multiple-choice task) goes into "
                                   "OUT/sweep.json.")
    s.add_argument("--config", required=True, metavar="FILE",
                   help="the run file giving data, batch, optimizer and precision (configs/pretrain/*.toml)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-file overrides, e.g. optim.lr=2e-3")
    s.add_argument("--budgets", required=True, metavar="C,C,...", help="compute budgets in FLOPs, e.g. 1e12,2e12,4e12")
    s.add_argument("--sizes", default=DEFAULT_SIZES, metavar="DxL,...",
                   help=f"model shapes on the tiny preset: DIMxLAYERS[xHEADS] (default {DEFAULT_SIZES})")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep folder (sweep.json and one run_dir per run); needed to train, not for --dry-run")
    s.add_argument("--task", default=None, metavar="NAME",
                   help="also score each final model on this multiple-choice task (e.g. arc_challenge)")
    s.add_argument("--task-limit", type=int, default=None, metavar="N", help="the task's first N questions (default all)")
    s.add_argument("--task-shots", type=int, default=0, metavar="K", help="few-shot examples (default 0)")
    s.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for training and scoring (default: torch's, one per core)")
    s.add_argument("--dry-run", action="store_true", help="print each run's params, tokens and steps; train nothing")
    s.add_argument("--verbose", action="store_true",
                   help="show the trainer's messages and progress bar (default: in each run's sweep.log)")
    s.set_defaults(func=cmd_sweep)

    f = sub.add_parser("fit", help="fit IsoFLOPs parabolas and the compute-optimal power law; plot",
                       formatter_class=fmt, epilog=FIT_EPILOG,
                       description="Per budget, a second-degree polynomial of validation loss in log10 tokens and "
                                   "its minimum; the power law tokens*(C) = A C^alpha (and params*(C)) by least "
                                   "squares in log space, with t-distribution confidence intervals; with task "
                                   "scores, NLL against compute and a sigmoid from NLL to accuracy.")
    f.add_argument("runs", nargs="+", metavar="RUNS", help="sweep folders or sweep.json files")
    f.add_argument("--out", default=None, metavar="DIR", help="where fit.json and the PNGs go (default: the first "
                                                               "sweep's folder)")
    f.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    f.add_argument("--json", action="store_true", help="print fit.json instead of the table")
    f.set_defaults(func=cmd_fit)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p
