"""Training sub-commands for ``llamalab``: ``pretrain`` and ``plot``.

Wire into :func:`llamalab.cli.build_parser` with ``add_pretrain_parser(sub)`` and
``add_plot_parser(sub)``. Bad configs and data raise ``ConfigError`` / ``DataError`` (both
``ValueError``), a run without metrics ``FileNotFoundError``: the CLI prints them as one line
(exit status 2). A run stopped by non-finite losses prints its message and exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_plot_parser", "add_pretrain_parser", "add_run_arguments", "cmd_plot", "cmd_pretrain", "format_schedule",
           "run_command"]

PLOT_EPILOG = """\
example:
  llamalab plot runs/tiny                 # writes runs/tiny/plots/loss.png and lr.png
  llamalab plot runs/tiny --out /tmp/plots
"""


PRETRAIN_EPILOG = """\
examples:
  llamalab pretrain --config configs/pretrain/cpu-shakespeare.toml
  llamalab pretrain --config configs/pretrain/cpu-shakespeare.toml train.total_steps=200 run_dir=runs/short
  torchrun --nproc_per_node 8 -m llamalab.cli pretrain --config configs/pretrain/llama1-7b.toml
  llamalab pretrain --config configs/pretrain/llama3-405b.toml --dry-run   # the staged schedule, resolved

Overrides are KEY=VALUE in TOML syntax (a bare word is a string). Running the same command
again resumes from the newest checkpoint in run_dir; SIGTERM saves one and exits with status 0.
"""


def run_command(args: argparse.Namespace, name: str, entry: str) -> int:
    """What every command that runs the training loop does: load the run file and its overrides,
    call ``entry`` ("module:function", taking ``(cfg, progress=...)`` and returning the summary),
    tear down the process group, print the summary (rank 0 only). Exit status 1 on a
    ``TrainingError``; a bad config raises ``ConfigError`` for the CLI's one-line message."""
    import importlib
    import json
    import os

    from llamalab.train.config import load_config

    cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    module, func = entry.split(":")
    fn = getattr(importlib.import_module(module), func)
    from llamalab.train.loop import TrainingError, format_summary

    try:
        summary = fn(cfg, progress=not args.no_progress)
    except TrainingError as e:
        print(f"llamalab {name}: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("world_size", 1) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def _tokens(n: int) -> str:
    """A token count short enough for a table column: 4,096 / 255.9M / 2.87T."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:,}"


def format_schedule(cfg: Any) -> str:
    """The resolved stages of a run as a table: steps, tokens, batch, length, RoPE, lr at each end."""
    from llamalab.train.optim import lr_at

    o = cfg.optim
    kw = dict(peak_lr=o.lr, warmup_steps=o.warmup_for(cfg.train.total_steps), total_steps=cfg.train.total_steps,
              min_lr_ratio=o.min_lr_ratio, schedule=o.schedule, anneal_steps=cfg.anneal_steps())
    head = ("stage", "steps", "tokens", "batch tokens", "seqs x len", "rope", "lr first .. last", "mixture")
    rows = []
    for r in cfg.schedule_table():
        if not r["steps"]:
            rows.append((str(r["stage"]), "(none)", f"from {_tokens(r['start_tokens'])}", "", "", "", "", ""))
            continue
        rope = f"{r['rope_theta']:g}" + (f" x{r['rope_scaling']['factor']:g}" if r["rope_scaling"] else "")
        lr = f"{lr_at(r['first_step'] - 1, **kw):.3g} .. {lr_at(r['last_step'] - 1, **kw):.3g}"
        mix = ", ".join(f"{k} {v:g}" for k, v in r["mixture"].items())
        rows.append((f"{r['stage']}{' anneal' if r['anneal'] else ''}", f"{r['first_step']:,}-{r['last_step']:,}",
                     f"{_tokens(r['tokens_from'])}-{_tokens(r['tokens_to'])}", f"{r['global_batch_tokens']:,}",
                     f"{r['sequences_per_batch']:,} x {r['seq_len']:,}", rope, lr, mix))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head, *rows]]
    last = cfg.schedule_table()[-1]
    lines.append(f"{cfg.train.total_steps:,} steps, {last['tokens_to']:,} tokens; warmup {kw['warmup_steps']:,} steps, "
                 f"{o.schedule}" + (f", anneal {kw['anneal_steps']:,} steps" if kw["anneal_steps"] else "")
                 + (", final = mean of the anneal's checkpoints" if cfg.checkpoint.average_anneal else ""))
    return "\n".join(lines)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Load the run file (+ overrides), train, print the summary (``--dry-run``: the schedule only)."""
    if getattr(args, "dry_run", False):
        import json
        import os

        from llamalab.train.config import load_config

        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        print(json.dumps(cfg.schedule_table()) if args.json else format_schedule(cfg))
        return 0
    return run_command(args, "pretrain", "llamalab.train.loop:train")


def add_pretrain_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pretrain`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "pretrain", help="pretrain a LLaMA model from a TOML run file",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PRETRAIN_EPILOG,
        description="Train a model on tokenized shards (llamalab tokenize) with the LLaMA recipe: AdamW, warmup + "
                    "cosine, clipping 1.0, gradient accumulation to the global batch; checkpoints, auto-resume, "
                    "metrics.jsonl and a final native checkpoint in run_dir/final. See docs/training.md.")
    add_run_arguments(p, "configs/pretrain/*.toml", "optim.lr=1e-3")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved schedule (each stage's steps, tokens, batch, length, RoPE, lr) and exit; "
                        "needs no data")
    p.set_defaults(func=cmd_pretrain)
    return p


def add_run_arguments(p: argparse.ArgumentParser, configs: str, example: str) -> None:
    """The arguments every command that runs the training loop takes: ``--config FILE``,
    ``KEY=VALUE`` overrides, ``--no-progress`` and ``--json``."""
    p.add_argument("--config", required=True, metavar="FILE", help=f"the run file ({configs})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot a run's loss and learning-rate curves from its metrics.jsonl."""
    from llamalab.train.metrics import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` sub-command to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "plot", help="plot a training run's loss and learning-rate curves",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLOT_EPILOG,
        description="Read RUN_DIR/metrics.jsonl and draw loss.png (train and validation loss) and lr.png "
                    "(needs matplotlib).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    return p


if __name__ == "__main__":  # python -m llamalab.train.cli plot RUN_DIR
    parser = argparse.ArgumentParser(prog="llamalab")
    add_plot_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
