"""Fine-tuning sub-commands for ``llamalab``: ``finetune`` and ``merge-lora``.

Torch is imported inside the commands only, so ``llamalab finetune --help`` stays fast. Bad
configs and data raise ``ConfigError`` (a ``ValueError``) before any compute: the CLI prints one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_finetune_data_parser", "add_finetune_parser", "add_merge_lora_parser", "cmd_finetune",
           "cmd_finetune_data", "cmd_merge_lora"]

FINETUNE_EPILOG = """\
examples:
  llamalab finetune --config configs/finetune/cpu-sft-lora.toml
  llamalab finetune --config configs/finetune/cpu-sft-lora.toml finetune.max_steps=20 run_dir=runs/sft-short
  llamalab finetune --config configs/finetune/cpu-dpo.toml model.checkpoint=runs/sft/final
  llamalab finetune --config configs/finetune/llama2-7b-chat-sft.toml model.checkpoint=/models/llama-2-7b

The run file is a pretraining run file (docs/training.md) plus [finetune], [lora] and [dpo]
sections (docs/finetune.md). Running the same command again resumes from the newest checkpoint
in run_dir; SIGTERM saves one and exits with status 0. The result is run_dir/final (with LoRA:
the merged model, and the adapter alone in run_dir/adapter).
"""

MERGE_EPILOG = """\
examples:
  llamalab merge-lora --base smollm2-135m-instruct --adapter runs/sft-lora/adapter --out merged
  llamalab merge-lora --base /models/llama-2-7b --adapter runs/a/adapter --out merged-hf --to hf
"""


def cmd_finetune(args: argparse.Namespace) -> int:
    """Load the run file (+ overrides), fine-tune, print the summary."""
    from llamalab.train.cli import run_command

    return run_command(args, "finetune", "llamalab.finetune.objectives:finetune")


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "finetune", help="SFT or DPO (full or LoRA) from a checkpoint and JSONL data",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FINETUNE_EPILOG,
        description="Fine-tune a checkpoint on conversations (SFT, loss on the assistant turns, packed) or "
                    "preference pairs (DPO with Llama 3's NLL term and formatting masks), all weights or LoRA "
                    "adapters, with the pretraining loop's optimizer, schedule, checkpoints and resume. "
                    "See docs/finetune.md.")
    from llamalab.train.cli import add_run_arguments

    add_run_arguments(p, "configs/finetune/*.toml", "optim.lr=1e-5")
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into its base checkpoint and write the result."""
    from pathlib import Path

    from llamalab.checkpoint import read_checkpoint, write_checkpoint
    from llamalab.checkpoint.base import Checkpoint, build_model
    from llamalab.finetune.lora import load_adapter, merge_lora

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; choose a new directory")
    ckpt = read_checkpoint(args.base)
    model = build_model(ckpt)
    config = load_adapter(model, args.adapter)
    n = merge_lora(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    merged = Checkpoint(config=model.config, state_dict=state, tokenizer=ckpt.tokenizer, format="llamalab-merge-lora",
                        path=Path(args.adapter))
    dst = write_checkpoint(merged, out, to=args.to)
    print(f"merged {n} adapted linears (rank {config.rank}, alpha {config.alpha:g}) into {args.base}: {dst} ({args.to})")
    return 0


def add_merge_lora_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``merge-lora`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "merge-lora", help="fold a LoRA adapter into its base model and write any checkpoint format",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MERGE_EPILOG,
        description="W += (alpha / rank) B A for every adapted linear of --base, then write the merged model "
                    "as a native, HF or Meta checkpoint (the tokenizer comes along).")
    p.add_argument("--base", required=True, metavar="CKPT", help="the base checkpoint (path or registered name)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="an adapter directory (run_dir/adapter)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint (new)")
    p.add_argument("--to", choices=("native", "hf", "meta"), default="native", help="output format (default native)")
    p.set_defaults(func=cmd_merge_lora)
    return p


DATA_EPILOG = """\
examples:
  llamalab finetune-data chatterbot --out data/sft/chatterbot.jsonl
  llamalab finetune-data code-pairs --out data/dpo/code-train.jsonl --val-out data/dpo/code-val.jsonl

chatterbot: the ChatterBot corpus's English dialogues (pip install --no-deps chatterbot-corpus; BSD).
code-pairs: HumanEval reference solutions (chosen) against one-bug variants (rejected), both executed
against the problem's unit tests; a pair is kept only if the chosen passes and the rejected fails.
Every other problem goes to --val-out. Do not score a model tuned on these pairs on HumanEval.
"""


def cmd_finetune_data(args: argparse.Namespace) -> int:
    """Write offline fine-tuning data (see DATA_EPILOG)."""
    import json

    from llamalab.finetune.datasets import chatterbot_conversations, code_preference_pairs, write_jsonl

    if args.source == "chatterbot":
        records = chatterbot_conversations(args.language, system=args.system)
        print(f"{write_jsonl(records, args.out)}: {len(records):,} conversations")
        return 0
    train, held, report = code_preference_pairs(per_problem=args.per_problem, holdout_every=2 if args.val_out else 0,
                                                progress=not args.no_progress)
    print(f"{write_jsonl(train, args.out)}: {len(train):,} pairs")
    if args.val_out:
        print(f"{write_jsonl(held, args.val_out)}: {len(held):,} held-out pairs")
    print(json.dumps(report))
    return 0


def add_finetune_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune-data`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "finetune-data", help="write offline SFT conversations or execution-checked preference pairs (JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EPILOG,
        description="Build fine-tuning data from installed packages, nothing downloaded: conversations for "
                    "SFT, preference pairs for DPO. See docs/finetune.md.")
    p.add_argument("source", choices=("chatterbot", "code-pairs"), help="which data to build")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    p.add_argument("--val-out", metavar="FILE", default=None, help="code-pairs: held-out pairs (every other problem)")
    p.add_argument("--per-problem", type=int, default=2, metavar="N", help="code-pairs: pairs per problem (default 2)")
    p.add_argument("--language", default="english", help="chatterbot: corpus language (default english)")
    p.add_argument("--system", default=None, metavar="TEXT", help="chatterbot: a system message for every record")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune_data)
    return p
