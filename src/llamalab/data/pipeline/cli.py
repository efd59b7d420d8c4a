"""``llamalab data run|report|mix|train-classifier|train-kenlm``: the data pipeline's commands."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_data_parser"]

DATA_EPILOG = """\
examples:
  llamalab data run configs/data/demo.toml
  llamalab data run configs/data/llama1.toml --sources web,c4 --executor ray
  llamalab data report runs/data/demo
  llamalab data train-classifier --reference wiki_refs.jsonl --random cc_sample.jsonl --out models/ref.bin
  llamalab data train-kenlm wiki_en.jsonl --sentencepiece tok/llama.model --out models/en.5gram.bin
"""


def _load(args: argparse.Namespace):  # noqa: ANN202 - the config dataclass, imported lazily
    from .config import load_config

    cfg = load_config(args.config)
    if getattr(args, "executor", None):
        cfg.executor.kind = args.executor
    if getattr(args, "tasks", None):
        cfg.executor.tasks = args.tasks
    if getattr(args, "workers", None):
        cfg.executor.workers = args.workers
    return cfg


def _print_report(run_dir: str, json_path: str | None = None, note: str = "") -> None:
    """Print the run's report table on stdout; say where its JSON went on stderr."""
    from .report import write_report

    table, path = write_report(run_dir, json_path)
    print(table)
    print(f"{note}report in {path}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the sources' stages, then the mixture (when a tokenizer is set), then print the report."""
    from .engine import run_config
    from .mixture import build_mixture

    cfg = _load(args)
    t0 = time.perf_counter()
    sources = [s for s in args.sources.split(",") if s] if args.sources else None
    try:
        run_config(cfg, sources=sources)
    except RuntimeError as e:  # a task failed: its message says how to resume
        raise ValueError(str(e)) from None
    if cfg.executor.kind == "slurm":
        print(f"data run: Slurm jobs submitted; when they finish: llamalab data mix {args.config}", file=sys.stderr)
        return 0
    if cfg.mixture.tokenizer and not args.no_mixture and not sources:
        build_mixture(cfg)
    _print_report(cfg.run_dir, note=f"data run: done in {time.perf_counter() - t0:.1f} s; ")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    """Sample the processed sources and tokenize them into shards."""
    from .mixture import build_mixture

    cfg = _load(args)
    build_mixture(cfg)
    _print_report(cfg.run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the per-source, per-step table and write it as JSON."""
    _print_report(args.run_dir, args.json)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train the Wikipedia-reference fastText classifier."""
    from .classifier import train_classifier

    rep = train_classifier(args.reference, args.random, args.out, heldout=args.heldout, epoch=args.epoch,
                           seed=args.seed)
    acc = f", held-out accuracy {rep.heldout_accuracy:.3f} on {rep.n_heldout}" if rep.heldout_accuracy is not None else ""
    print(f"wrote {rep.path}: {rep.n_reference:,} reference and {rep.n_random:,} random pages{acc}", file=sys.stderr)
    return 0


def cmd_train_kenlm(args: argparse.Namespace) -> int:
    """Train a KenLM n-gram model on SentencePiece pieces of normalised text."""
    from .kenlm_train import train_kenlm

    t0 = time.perf_counter()
    out = train_kenlm(args.inputs, args.sentencepiece, args.out, order=args.order, binary=not args.arpa)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` and its actions to the ``llamalab`` sub-commands; returns its parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("data", help="the pretraining-data pipeline (sources -> filters -> mixture -> shards)",
                              formatter_class=fmt, epilog=DATA_EPILOG,
                              description="LLaMA's data pipeline on datatrove executors: see docs/data-pipeline.md.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")

    r = sub.add_parser("run", help="run a data config: every source, then the mixture", formatter_class=fmt,
                       description="Process each source (reader, filters, global exact dedup) into RUN_DIR/<source>/"
                                   "output, sample the mixture and tokenize it into RUN_DIR/shards, print the report. "
                                   "Re-running resumes: completed tasks are skipped.",
                       epilog="examples:\n  llamalab data run configs/data/demo.toml\n"
                              "  llamalab data run configs/data/llama1.toml --executor ray --tasks 64\n"
                              "  llamalab data run configs/data/demo.toml --sources books --no-mixture")
    r.add_argument("config", help="data TOML (configs/data/*.toml)")
    r.add_argument("--sources", default="", help="comma-separated source names to run (default: all; "
                                                 "the mixture runs only when all are run)")
    r.add_argument("--executor", choices=["local", "ray", "slurm"], default=None, help="override executor.kind")
    r.add_argument("--tasks", type=int, default=None, help="override executor.tasks")
    r.add_argument("--workers", type=int, default=None, help="override executor.workers")
    r.add_argument("--no-mixture", action="store_true", help="stop after the sources' outputs")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("mix", help="sample the processed sources into token shards", formatter_class=fmt,
                       epilog="example:\n  llamalab data mix configs/data/demo.toml")
    m.add_argument("config", help="data TOML")
    m.set_defaults(func=cmd_mix)

    rep = sub.add_parser("report", help="documents in/out and drop reasons per source and step", formatter_class=fmt,
                         epilog="example:\n  llamalab data report runs/data/demo\n"
                                "  llamalab data report runs/data/demo --json /tmp/report.json")
    rep.add_argument("run_dir", help="the run_dir of a data config")
    rep.add_argument("--json", default=None, help="where to write the JSON (default RUN_DIR/report.json)")
    rep.set_defaults(func=cmd_report)

    c = sub.add_parser("train-classifier", help="train the Wikipedia-reference fastText classifier",
                       formatter_class=fmt,
                       description="A linear fastText classifier of pages cited by Wikipedia (reference) vs random "
                                   "pages; the commoncrawl source keeps pages with p(reference) >= 0.25.",
                       epilog="example:\n  llamalab data train-classifier --reference refs.jsonl --random cc.jsonl "
                              "--out models/ref.bin")
    c.add_argument("--reference", nargs="+", required=True, help="pages cited by Wikipedia (.jsonl/.txt)")
    c.add_argument("--random", nargs="+", required=True, help="random CommonCrawl pages (.jsonl/.txt)")
    c.add_argument("--out", required=True, help="model file to write")
    c.add_argument("--heldout", type=float, default=0.1, help="fraction held out for accuracy (default 0.1)")
    c.add_argument("--epoch", type=int, default=5, help="training epochs (default 5)")
    c.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    c.set_defaults(func=cmd_train_classifier)

    k = sub.add_parser("train-kenlm", help="train the KenLM n-gram model of the perplexity step (lmplz)",
                       formatter_class=fmt,
                       description="Normalise and SentencePiece-split the text as the perplexity step does, then "
                                   "train with KenLM's lmplz (built by `make lmplz`).",
                       epilog="example:\n  llamalab data train-kenlm wiki_en.jsonl --sentencepiece tok/llama.model "
                              "--out models/en.5gram.bin")
    k.add_argument("inputs", nargs="+", help=".jsonl/.txt files or directories")
    k.add_argument("--sentencepiece", required=True, help="SentencePiece .model to split the text with")
    k.add_argument("--out", required=True, help="model file to write")
    k.add_argument("--order", type=int, default=5, help="n-gram order (default 5)")
    k.add_argument("--arpa", action="store_true", help="write ARPA text instead of KenLM's binary format")
    k.set_defaults(func=cmd_train_kenlm)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p
