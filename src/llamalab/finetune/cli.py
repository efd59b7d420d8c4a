"""Fine-tuning sub-commands for ``llamalab``: ``finetune``, ``finetune-data``, ``merge-lora``, ``reward``,
``rejection-sample`` and ``gatt``.

Torch is imported inside the commands only, so ``llamalab finetune --help`` stays fast. Bad
configs and data raise ``ConfigError`` (a ``ValueError``) before any compute: the CLI prints one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_finetune_data_parser", "add_finetune_parser", "add_gatt_parser", "add_merge_lora_parser",
           "add_reward_parser", "add_rejection_parser", "cmd_finetune", "cmd_finetune_data", "cmd_gatt_data",
           "cmd_gatt_eval", "cmd_merge_lora", "cmd_rejection_sample", "cmd_reward_score"]

FINETUNE_EPILOG = """\
examples:
  llamalab finetune --config configs/finetune/cpu-sft-lora.toml
  llamalab finetune --config configs/finetune/cpu-sft-lora.toml finetune.max_steps=20 run_dir=runs/sft-short
  llamalab finetune --config configs/finetune/cpu-dpo.toml model.checkpoint=runs/sft/final
  llamalab finetune --config configs/finetune/llama2-7b-chat-sft.toml model.checkpoint=/models/llama-2-7b
  llamalab finetune --config configs/finetune/cpu-ppo-arith.toml ppo.iterations=4   # PPO with a reward model

The run file is a pretraining run file (docs/training.md) plus [finetune], [lora], [dpo],
[reward] and [ppo] sections (docs/finetune.md, docs/rlhf.md); finetune.method is "sft", "dpo",
"reward" (a reward model: the trunk with a scalar head, Llama 2's margin loss; use it with
`llamalab reward score`) or "ppo" (Llama 2's PPO: answers sampled through the engine, a reward
model's shaped score, a per-token KL penalty, a value model, held-out early stopping; `llamalab
plot RUN_DIR` draws its curves). Running the same command again resumes from the newest checkpoint
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
        "finetune", help="SFT, DPO, a reward model or PPO (full or LoRA) from a checkpoint and JSONL data",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FINETUNE_EPILOG,
        description="Fine-tune a checkpoint on conversations (SFT, loss on the assistant turns, packed) or "
                    "preference pairs (DPO with Llama 3's NLL term and formatting masks; a reward model with Llama 2's "
                    "margin loss), or with PPO against a reward model (Llama 2's reward shaping and KL penalty), all "
                    "weights or LoRA "
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
  llamalab finetune-data arithmetic --out data/rlhf/arith-rs.jsonl --count 100 --offset 200 --ops +
  llamalab finetune-data checked-pairs --prompts data/rlhf/arith-rm.jsonl --policy smollm2-135m-instruct \
      --k 16 --temperature 0.7 --out data/rlhf/arith-pairs.jsonl --val-out data/rlhf/arith-pairs-val.jsonl

code-pairs: HumanEval reference solutions (chosen) against one-bug variants (rejected), both executed
against the problem's unit tests; a pair is kept only if the chosen passes and the rejected fails.
Every other problem goes to --val-out. Do not score a model tuned on these pairs on HumanEval.
arithmetic: addition/subtraction questions with their answers (prompt records {"id", "prompt", "answer"});
slices at different --offset never share a question.
checked-pairs: the policy's own answers to prompts that carry an "answer", sampled --k times and
checked (the final number, as GSM8K is scored): a correct answer (chosen) against a wrong one
(rejected). Every 5th prompt's pairs go to --val-out. The samples are kept (resumable) in OUT.samples/.
"""


def cmd_finetune_data(args: argparse.Namespace) -> int:
    """Write offline fine-tuning data (see DATA_EPILOG)."""
    import json

    from llamalab.finetune.datasets import chatterbot_conversations, code_preference_pairs, write_jsonl

    if args.source == "chatterbot":
        records = chatterbot_conversations(args.language, system=args.system)
        print(f"{write_jsonl(records, args.out)}: {len(records):,} conversations")
        return 0
    if args.source == "arithmetic":
        from llamalab.finetune.datasets import arithmetic_prompts

        records = arithmetic_prompts(args.count, offset=args.offset, low=args.low, high=args.high, ops=args.ops)
        print(f"{write_jsonl(records, args.out)}: {len(records):,} questions")
        return 0
    if args.source == "checked-pairs":
        return _checked_pairs(args)
    train, held, report = code_preference_pairs(per_problem=args.per_problem, holdout_every=2 if args.val_out else 0,
                                                progress=not args.no_progress)
    print(f"{write_jsonl(train, args.out)}: {len(train):,} pairs")
    if args.val_out:
        print(f"{write_jsonl(held, args.val_out)}: {len(held):,} held-out pairs")
    print(json.dumps(report))
    return 0


def _checked_pairs(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from llamalab.api import load
    from llamalab.finetune.datasets import checked_pairs, write_jsonl
    from llamalab.finetune.rejection import SamplingPlan, read_prompts, run_sampling, sampling_report
    from llamalab.generate.engine import Generator

    if not args.prompts or not args.policy:
        raise ValueError("finetune-data checked-pairs: needs --prompts FILE (records with an \"answer\") and "
                         "--policy CHECKPOINT")
    for f in args.prompts:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--prompts {f}: no such file; expected JSONL prompt records with an \"answer\"")
    lm = load(args.policy, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    prompts, summary = read_prompts(args.prompts)
    missing = [p for p in prompts if p.answer is None]
    if missing:
        raise ValueError(f"{missing[0].file}:{missing[0].line}: no \"answer\" field; checked pairs need one per prompt")
    plan = SamplingPlan(k=args.k, temperatures=[args.temperature], max_new_tokens=args.max_new_tokens, seed=args.seed)
    records = run_sampling(Generator(lm.model, lm.tokenizer), prompts, plan, Path(str(args.out) + ".samples"),
                           meta={"policy": args.policy, "files": list(args.prompts), "dtype": args.dtype},
                           progress=not args.no_progress)
    held = [r for r in records if r["index"] % 5 == 4] if args.val_out else []
    train = [r for r in records if not (args.val_out and r["index"] % 5 == 4)]
    pairs = checked_pairs(train, per_prompt=args.per_problem, seed=args.seed)
    print(f"{write_jsonl(pairs, args.out)}: {len(pairs):,} pairs from {len(train):,} prompts")
    if args.val_out:
        val = checked_pairs(held, per_prompt=args.per_problem, seed=args.seed)
        print(f"{write_jsonl(val, args.val_out)}: {len(val):,} held-out pairs from {len(held):,} prompts")
    rep = sampling_report(records)
    print(json.dumps({"prompts": len(records), "set_aside": len(summary.set_aside),
                      "samples_per_s": rep["samples_per_s"], **next(iter(rep["by_temperature"].values()))}))
    return 0


def add_finetune_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune-data`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "finetune-data", help="write offline SFT conversations or execution-checked preference pairs (JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EPILOG,
        description="Build fine-tuning data from installed packages, nothing downloaded: conversations for "
                    "SFT, preference pairs for DPO. See docs/finetune.md.")
    p.add_argument("source", choices=("chatterbot", "code-pairs", "arithmetic", "checked-pairs"),
                   help="which data to build")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    p.add_argument("--val-out", metavar="FILE", default=None,
                   help="code-pairs: held-out pairs (every other problem); checked-pairs: every 5th prompt's")
    p.add_argument("--per-problem", type=int, default=2, metavar="N",
                   help="code-pairs, checked-pairs: pairs per problem (default 2)")
    p.add_argument("--count", type=int, default=100, metavar="N", help="arithmetic: questions (default 100)")
    p.add_argument("--offset", type=int, default=0, metavar="N", help="arithmetic: where the slice starts (default 0)")
    p.add_argument("--low", type=int, default=1, help="arithmetic: smallest operand (default 1)")
    p.add_argument("--high", type=int, default=30, help="arithmetic: largest operand (default 30)")
    p.add_argument("--ops", default="+-", help="arithmetic: operations, some of + and - (default +-)")
    p.add_argument("--prompts", nargs="+", metavar="FILE", help="checked-pairs: prompt records with an \"answer\"")
    p.add_argument("--policy", metavar="CHECKPOINT", help="checked-pairs: the model whose answers are paired")
    p.add_argument("--k", type=int, default=16, help="checked-pairs: answers sampled per prompt (default 16)")
    p.add_argument("--temperature", type=float, default=0.7, help="checked-pairs: sampling temperature (default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="checked-pairs: answer length limit")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="checked-pairs: policy dtype")
    p.add_argument("--seed", type=int, default=0, help="checked-pairs: sampling and pairing seed")
    p.add_argument("--language", default="english", help="chatterbot: corpus language (default english)")
    p.add_argument("--system", default=None, metavar="TEXT", help="chatterbot: a system message for every record")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune_data)
    return p


REWARD_EPILOG = """\
examples:
  llamalab finetune --config configs/finetune/cpu-reward.toml          # train one (finetune.method = "reward")
  llamalab reward score --model runs/cpu-reward/final --input data/dpo/code-val.jsonl --out scored.jsonl
  llamalab reward score --model runs/cpu-reward/final --input samples.jsonl --json --dtype bfloat16

Input records: {"prompt" | "messages", "response"} (adds "reward"), preference pairs {..., "chosen",
"rejected"} (adds "reward_chosen" and "reward_rejected", and prints the accuracy by preference level),
or {"messages"} ending with the assistant's turn. Bad records are set aside with their line numbers.
"""


def cmd_reward_score(args: argparse.Namespace) -> int:
    """Score JSONL responses with a trained reward model."""
    import json
    import math

    import torch

    from llamalab.finetune.datasets import write_jsonl
    from llamalab.finetune.reward import accuracy_by_level, format_accuracy_table, load_reward_model, score_jsonl

    from pathlib import Path

    for f in args.input:  # before the model is loaded: fail before any compute
        if not Path(f).is_file():
            raise FileNotFoundError(f"--input {f}: no such file; expected JSONL records to score")
    if args.threads:
        torch.set_num_threads(args.threads)
    rm = load_reward_model(args.model, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="scoring", unit="response", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    records, summary = score_jsonl(rm, args.input, batch_size=args.batch_size, progress=progress)
    if bar is not None:
        bar.close()
    if summary.set_aside:
        print(f"reward score: set aside: " + summary.format().replace("\n", "\n    "), file=sys.stderr)
    if args.out:
        print(f"{write_jsonl(records, args.out)}: {len(records):,} scored records", file=sys.stderr)
    pairs = [r for r in records if "reward_chosen" in r]
    report: dict[str, Any] = {"records": len(records), "set_aside": len(summary.set_aside)}
    singles = [r["reward"] for r in records if "reward" in r]
    if singles:
        mean = sum(singles) / len(singles)
        report["reward"] = {"n": len(singles), "mean": mean,
                            "std": math.sqrt(sum((x - mean) ** 2 for x in singles) / len(singles))}
    if pairs:
        acc = accuracy_by_level([r["reward_chosen"] - r["reward_rejected"] for r in pairs],
                                [r.get("preference") for r in pairs])
        report["accuracy_by_level"] = acc
        if not args.json:
            print(format_accuracy_table(acc))
    if args.json:
        print(json.dumps(report, indent=2))
    elif singles:
        print(f"{len(singles):,} responses: mean reward {report['reward']['mean']:.4f}, std {report['reward']['std']:.4f}")
    if not args.out and not args.json:
        for r in records[:5]:
            print(json.dumps({k: v for k, v in r.items() if k.startswith("reward")}))
    return 0


def add_reward_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reward`` sub-command (``reward score``) to ``subparsers``."""
    p = subparsers.add_parser(
        "reward", help="use a trained reward model: score JSONL responses or preference pairs",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REWARD_EPILOG,
        description="Reward models (Llama 2 §3.2.2) are trained with `llamalab finetune` and finetune.method = "
                    "\"reward\"; this command scores responses with one: the scalar head at the last token of "
                    "each rendered conversation. See docs/finetune.md.")
    sub = p.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    s = sub.add_parser("score", help="add reward scores to JSONL records", epilog=REWARD_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, metavar="DIR", help="a reward model (run_dir/final of a reward run)")
    s.add_argument("--input", required=True, nargs="+", metavar="FILE", help="JSONL files to score")
    s.add_argument("--out", metavar="FILE", default=None, help="write the records with their scores here (JSONL)")
    s.add_argument("--batch-size", type=int, default=8, metavar="N", help="responses per forward (default 8)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (default float32; bfloat16 is faster where the CPU has "
                        "native bf16, e.g. AVX512-BF16 or AMX)")
    s.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: torch's)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_reward_score)
    return p


REJECTION_EPILOG = """\
examples:
  llamalab rejection-sample --config configs/finetune/cpu-rejection-sampling.toml
  llamalab rejection-sample --config configs/finetune/cpu-rejection-sampling.toml --sample-only rejection.k=16
  llamalab rejection-sample --config configs/finetune/llama2-rejection-sampling.toml \\
      model.checkpoint=runs/rlhf-v3/final rejection.reward_model=runs/rm-helpful/final \\
      'rejection.keep_from=["runs/rs-v1", "runs/rs-v2"]' run_dir=runs/rs-v3

The run file is a fine-tuning run file (finetune.method = "sft") with a [rejection] section:
reward_model, prompts (JSONL: {"prompt"} or {"messages"} ending with the user, optional "id", "tag",
"answer"), k, temperatures (several = a sweep), max_new_tokens, keep_from, eval_prompts. Writes
run_dir/sampling/ (samples.jsonl, report.json, best-of-k.png, rewards.png), run_dir/selected.jsonl,
then SFT on it into run_dir/final, and held-out before/after figures (eval-before/, eval-after/,
eval-rewards.png, report.json). Running the same command again resumes every step.
"""


def cmd_rejection_sample(args: argparse.Namespace) -> int:
    """One rejection-sampling iteration: sample, score, select, SFT, evaluate."""
    import json

    from llamalab.finetune.rejection import format_report, rejection_finetune
    from llamalab.train.config import load_config
    from llamalab.train.loop import TrainingError, format_summary

    cfg = load_config(args.config, args.overrides)
    try:
        result = rejection_finetune(cfg, progress=not args.no_progress, sample_only=args.sample_only)
    except TrainingError as e:
        print(f"llamalab rejection-sample: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    if "status" in result:
        print(format_summary(result))
    print(format_report(result["rejection"]))
    return 0


def add_rejection_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rejection-sample`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "rejection-sample", help="rejection-sampling fine-tuning: best of K samples by a reward model, then SFT",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REJECTION_EPILOG,
        description="Llama 2's rejection-sampling fine-tuning (§3.2.3): K samples per prompt from the policy "
                    "(batched, KV cache), scored by a reward model, the best kept (with the best of earlier "
                    "iterations) and fine-tuned on with SFT; best-of-k curves per temperature (Fig. 7). "
                    "Resumable at prompt granularity. See docs/rlhf.md.")
    from llamalab.train.cli import add_run_arguments

    add_run_arguments(p, "configs/finetune/*rejection*.toml", "rejection.k=8")
    p.add_argument("--sample-only", action="store_true", help="sample, score and select; no SFT step")
    p.set_defaults(func=cmd_rejection_sample)
    return p


GATT_EPILOG = """\
examples:
  llamalab gatt data --policy smollm2-135m-instruct --dialogues 96 --turns 6 --out data/gatt/train.jsonl \\
      --held-out 48 --held-out-out data/gatt/eval.jsonl
  llamalab finetune --config configs/finetune/cpu-gatt.toml        # SFT on it, finetune.train_on = "last"
  llamalab gatt eval --model before=smollm2-135m-instruct --model after=runs/cpu-gatt/final \\
      --dialogues data/gatt/eval.jsonl --out runs/cpu-gatt/adherence.json --plot runs/cpu-gatt/adherence.png

`gatt data` samples the policy's answers with the instruction put before every user message and
writes SFT records with the instruction in the system message only, one per turn, each ending with
the turn that carries the loss (train them with finetune.train_on = "last"). `gatt eval` puts the
instruction in the system message only, lets each model answer every turn with its own earlier
answers in the context (greedy), and checks each answer: language by fastText lid.176, a sign-off
word, capital letters. See docs/rlhf.md.
"""


def _load_generator(model: str, dtype: str) -> Any:
    import torch

    from llamalab.api import load
    from llamalab.generate.engine import Generator

    lm = load(model, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    return Generator(lm.model, lm.tokenizer)


def cmd_gatt_data(args: argparse.Namespace) -> int:
    """Build GAtt training records (and held-out evaluation dialogues)."""
    import random

    from llamalab.finetune.datasets import write_jsonl
    from llamalab.finetune.gatt import CHECKABLE, Constraint, Instruction, _value, dialogue_pools, gatt_records, \
        sample_gatt_answers, sample_instruction

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.held_out and not args.held_out_out:  # before any compute
        raise ValueError("--held-out: give --held-out-out FILE for the held-out dialogues")
    eval_kinds = [k.strip() for k in args.eval_kinds.split(",") if k.strip()]
    if not eval_kinds or set(eval_kinds) - set(CHECKABLE):
        raise ValueError(f"--eval-kinds {args.eval_kinds}: expected some of {', '.join(CHECKABLE)} (the kinds "
                         f"with a programmatic check)")
    if args.k < 1:
        raise ValueError(f"--k {args.k}: expected at least 1 candidate a turn")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    train, held = dialogue_pools(args.turns, args.dialogues, args.held_out, seed=args.seed)
    rng = random.Random(args.seed)
    instructions = [sample_instruction(rng, kinds, max_constraints=args.max_constraints, short_share=args.short_share)
                    for _ in train]
    gen = _load_generator(args.policy, args.dtype)
    fmt = None if args.chat_format == "auto" else args.chat_format
    answers = sample_gatt_answers(gen, train, instructions, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed, fmt=fmt, batch_size=args.batch_size,
                                  k=args.k, progress=not args.no_progress)
    records = gatt_records(train, instructions, answers, every_turn=not args.last_turn_only, keep=args.keep)
    write_jsonl(records, args.out)
    checked = [(inst.check(a)) for inst, ans in zip(instructions, answers) for a in ans]
    known = [c for c in checked if c is not None]
    print(f"gatt data: {len(train)} dialogues of {args.turns} turns, {len(records):,} records -> {args.out}"
          + (f"; {100 * sum(known) / len(known):.1f}% of the checkable answers obey their instruction "
             f"(the instruction before every user message)" if known else ""), file=sys.stderr)
    if args.held_out:
        evals = []
        for i, users in enumerate(held):
            kind = eval_kinds[i % len(eval_kinds)]
            inst = Instruction((Constraint(kind, _value(kind, rng)),))
            evals.append({"users": users, "instruction": inst.to_dict()})
        write_jsonl(evals, args.held_out_out)
        print(f"gatt data: {len(evals)} held-out dialogues ({', '.join(eval_kinds)}) -> {args.held_out_out}",
              file=sys.stderr)
    return 0


def cmd_gatt_eval(args: argparse.Namespace) -> int:
    """Adherence to a system instruction by turn, for one or more models."""
    import json
    from pathlib import Path

    from llamalab.finetune.gatt import Instruction, adherence_by_turn, format_adherence, plot_adherence, write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = Path(args.dialogues)
    if not path.is_file():
        raise FileNotFoundError(f"--dialogues {path}: no such file (make one with `llamalab gatt data --held-out N`)")
    dialogues, instructions = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            users, inst = rec["users"][:args.turns or None], Instruction.from_dict(rec["instruction"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: expected {{\"users\": [...], \"instruction\": {{...}}}} ({e})") from None
        dialogues.append(users)
        instructions.append(inst)
    if not dialogues or len({len(u) for u in dialogues}) != 1:
        raise ValueError(f"{path}: expected dialogues with the same number of user turns")
    results = {}
    for spec in args.model:
        name, _, model = spec.rpartition("=") if "=" in spec else ("", "", spec)
        gen = _load_generator(model, args.dtype)
        res = adherence_by_turn(gen, dialogues, instructions, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, progress=not args.no_progress)
        results[name or model] = {**res, "model": model}
    if args.out:
        write_json(results, args.out)
    if args.plot:
        plot_adherence(results, args.plot)
    if args.json:
        print(json.dumps({k: {x: v[x] for x in ("turns", "by_kind", "all", "counts", "model")} for k, v in results.items()}))
    else:
        print(format_adherence(results))
    return 0


def add_gatt_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gatt`` sub-command (``gatt data``, ``gatt eval``) to ``subparsers``."""
    p = subparsers.add_parser(
        "gatt", help="Ghost Attention: multi-turn instruction data, and adherence by turn",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=GATT_EPILOG,
        description="Llama 2's Ghost Attention (§3.3): build fine-tuning data that keeps a system instruction "
                    "in force over many turns, and measure how often each turn's answer obeys it (Table 30).")
    sub = p.add_subparsers(dest="gatt_command", metavar="ACTION", required=True)
    d = sub.add_parser("data", help="sample answers with the instruction in every turn; write SFT records",
                       epilog=GATT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--policy", required=True, metavar="MODEL", help="the model whose answers are sampled")
    d.add_argument("--out", required=True, metavar="FILE", help="the SFT records (JSONL)")
    d.add_argument("--dialogues", type=int, default=96, metavar="N", help="training dialogues (default 96)")
    d.add_argument("--turns", type=int, default=6, metavar="N", help="user turns per dialogue (default 6)")
    d.add_argument("--kinds", default="language,figure,hobby,word,caps", metavar="K,K",
                   help="constraint kinds to draw from (default: all five)")
    d.add_argument("--max-constraints", type=int, default=2, metavar="N", help="constraints combined (default 2)")
    d.add_argument("--short-share", type=float, default=0.5, metavar="P",
                   help="share of shortened instructions (default 0.5, as Llama 2)")
    d.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="per answer (default 48)")
    d.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature (default 0.7)")
    d.add_argument("--k", type=int, default=1, metavar="N",
                   help="candidates per turn; the first that ends and obeys the instruction is kept (default 1)")
    d.add_argument("--keep", choices=("all", "obeying"), default="obeying",
                   help="keep every turn, or only turns up to a dialogue's first answer that breaks a checkable "
                        "instruction (default)")
    d.add_argument("--last-turn-only", action="store_true", help="one record per dialogue (its last turn)")
    d.add_argument("--held-out", type=int, default=0, metavar="N",
                   help="also write N held-out dialogues (other user messages) with one checkable instruction each")
    d.add_argument("--held-out-out", metavar="FILE", default=None, help="where the held-out dialogues go (JSONL)")
    d.add_argument("--eval-kinds", default="language,word,caps", metavar="K,K",
                   help="the held-out dialogues' instruction kinds, in turn (default: every checkable kind)")
    d.add_argument("--chat-format", default="auto", choices=("auto", "template", "llama3", "llama2"))
    d.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows per generation batch (k a dialogue)")
    d.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: torch's)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_gatt_data)
    e = sub.add_parser("eval", help="share of answers obeying the system instruction, by turn",
                       epilog=GATT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", required=True, action="append", metavar="[NAME=]MODEL",
                   help="a model to evaluate; repeat to compare (before=..., after=...)")
    e.add_argument("--dialogues", required=True, metavar="FILE", help="held-out dialogues from `gatt data --held-out`")
    e.add_argument("--turns", type=int, default=0, metavar="N", help="use the first N turns (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="per answer (default 48)")
    e.add_argument("--out", metavar="FILE", default=None, help="every answer and check, and the table (JSON)")
    e.add_argument("--plot", metavar="PNG", default=None, help="adherence by turn, one line per model")
    e.add_argument("--batch-size", type=int, default=16, metavar="N", help="dialogues per generation batch")
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    e.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: torch's)")
    e.add_argument("--json", action="store_true", help="print the table as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_gatt_eval)
    return p
