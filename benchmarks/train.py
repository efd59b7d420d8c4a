"""Training speed: llamalab's Transformer against HF transformers' ``LlamaForCausalLM``, same config.

One training step = forward + cross-entropy + backward + AdamW step (β 0.9/0.95, weight decay
0.1 on 2-D weights, eps 1e-5, lr 3e-4; ``llamalab.train.optim.build_optimizer`` for both
sides, torch's default AdamW implementation unless a lever says otherwise), batch 8 x 256
random tokens, 2 threads. Both models start from the same weights (llamalab's init, converted
with ``checkpoint.convert.meta_state_dict_to_hf``) and compute the loss the same way
(``F.cross_entropy`` on fp32 logits).

Shapes: ``15m`` = llama2.c's stories15M (dim 288, 6 layers, 6 heads, vocab 32000, SwiGLU
768, tied embeddings: preset ``tiny-15m``) and ``135m`` = preset
``smollm2-135m``. Dtypes: ``fp32`` and ``bf16`` (autocast, fp32 weights and optimizer).

Every measurement is a fresh process (build, ``--warmup`` steps, then ``--steps`` timed
steps); the parent runs them interleaved (A B A B ..., the order flipped every round) and
reports medians over ``--rounds``. tok/s = 2048 / the median timed step of a process (the
median resists a step slowed by another process; "best" = 2048 / the fastest step seen). MFU = tok/s *
``train.metrics.flops_per_token`` (6 N + 12 n_layers dim seq_len, PaLM) / peak, with the
peak of the precision the matmuls run in: bf16 860 GFLOP/s; fp32 MKL 200 GFLOP/s
(torch's default fp32 GEMM) or fp32 oneDNN 440 GFLOP/s (the ``onednn`` lever); on a CPU
without AVX-512, fp32 divides by ``cpu-avx2-fp32`` (170 GFLOP/s, the AVX2 EPYC's MKL)
(``train.metrics.PEAK_FLOPS``). The peak used is printed in each row.

Implementations (``--impls``): ``transformers``, ``llamalab``, and llamalab with levers from
``llamalab.train.speed`` joined by ``+``: ``chunkce`` (the output head and cross-entropy fused and
chunked, ``train.loss.linear_cross_entropy``, as ``llamalab pretrain`` runs by default),
``heap`` (glibc keeps freed memory: no page faults every step, ``llamalab.allocator``; also
applies to ``transformers+heap``),
``onednn`` (fp32 GEMMs in oneDNN), ``mmattn`` (attention as two batched products,
``speed.use_matmul_attention``), ``fused`` /
``foreach`` (AdamW implementation), ``compile`` (torch.compile per block; the first step's
extra time is reported as compile time), ``sdpa-math`` / ``sdpa-flash``, ``fp32-bf16``
(oneDNN fp32 matmul precision "bf16": a precision change). Example:
``--impls llamalab,llamalab+onednn+fused,transformers``. A lever name alone on a
``transformers+...`` entry applies the optimizer/SDPA levers to transformers too. ``lora`` trains
LoRA adapters only (rank 8, alpha 16 on q, v, o and the SwiGLU linears): ``llamalab.finetune.lora``
on llamalab, peft on transformers (``transformers+lora``); its MFU counts 4N of the 6N FLOPs
(no weight gradients for the frozen matrices).

Usage: ``python benchmarks/train.py [--shapes 15m,135m] [--dtypes fp32,bf16] [--steps 3]
[--warmup 2] [--rounds 3] [--impls llamalab,transformers] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
BATCH, SEQ = 8, 256
LEVERS = ("onednn", "fused", "foreach", "compile", "compile-full", "sdpa-math", "sdpa-flash", "fp32-bf16", "chunkce", "heap",
          "mmattn", "lora")
# LoRA as torchtune's Llama recipes (and llamalab's default): q, v, attention output and the SwiGLU
# linears, rank 8, alpha 16, no dropout; llamalab.finetune.lora on llamalab, peft on transformers.
LORA_TARGETS = {"wq": "q_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
SHAPES = {"15m": ("tiny-15m", {}), "135m": ("smollm2-135m", {})}


def model_config(shape: str):
    """The ModelConfig of a shape name (see the module docstring)."""
    from llamalab.config import get_preset

    preset, overrides = SHAPES[shape]
    return get_preset(preset, **overrides)


def peak_name(dtype: str, levers: list[str]) -> str:
    """Which PEAK_FLOPS entry an MFU figure divides by."""
    if dtype == "bf16" or "fp32-bf16" in levers:
        return "cpu-dev-bf16"
    from llamalab.precision import cpu_flags

    if "avx512f" not in cpu_flags():  # the cpu-dev peaks are the AVX-512 machine's
        return "cpu-avx2-fp32"
    return "cpu-dev-fp32-onednn" if "onednn" in levers else "cpu-dev-fp32-mkl"


# --------------------------------------------------------------------------- child: one measurement


def child(spec: dict) -> dict:
    """Build one model, train ``warmup + steps`` steps, return timings (runs in its own process)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    from llamalab.model import Transformer
    from llamalab.train import speed
    from llamalab.train.loss import linear_cross_entropy
    from llamalab.train.optim import build_optimizer

    impl, *levers = spec["impl"].split("+")
    bad = [lv for lv in levers if lv not in LEVERS]
    if bad:
        raise SystemExit(f"unknown lever(s) {bad}; known: {', '.join(LEVERS)}")
    config = model_config(spec["shape"])
    config.max_seq_len = max(config.max_seq_len, SEQ)
    bf16 = spec["dtype"] == "bf16"

    if "heap" in levers:  # process-wide: glibc keeps freed memory (llamalab.allocator); either implementation
        from llamalab.allocator import reuse_freed_memory

        reuse_freed_memory()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = Transformer(config)
    ref.init_weights()
    if impl == "llamalab":
        model = ref
        if "lora" in levers:
            from llamalab.finetune.lora import LoRAConfig, apply_lora

            apply_lora(model, LoRAConfig(rank=8, alpha=16.0, targets=list(LORA_TARGETS)))
        if "onednn" in levers:
            speed.use_onednn_linear(model)
        if "mmattn" in levers:
            speed.use_matmul_attention(model)
        if "compile" in levers:
            speed.compile_blocks(model)
    elif impl == "transformers":
        import transformers

        from llamalab.checkpoint.convert import config_to_hf, meta_state_dict_to_hf

        hf_cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa"))
        model.load_state_dict(meta_state_dict_to_hf(ref.state_dict(), config), strict=False)
        if config.tie_embeddings:
            model.tie_weights()
        del ref
        if "lora" in levers:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                               target_modules=list(LORA_TARGETS.values())))
        if {"onednn", "compile", "chunkce", "mmattn"} & set(levers):  # (heap, fused, foreach, sdpa-*: both)
            raise SystemExit("levers onednn/compile/chunkce/mmattn are llamalab's only")
    else:
        raise SystemExit(f"unknown implementation {impl!r}")
    if "compile-full" in levers:
        model = torch.compile(model)
    if "fp32-bf16" in levers:
        speed.set_fp32_matmul_precision("bf16")
    model.train()
    opt_impl = "fused" if "fused" in levers else "foreach" if "foreach" in levers else "default"
    opt = build_optimizer(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-5)
    if opt_impl != "default":  # same groups, other implementation
        opt = torch.optim.AdamW(opt.param_groups, lr=3e-4, betas=(0.9, 0.95), eps=1e-5,
                                **speed.adamw_impl_kwargs(opt_impl))
    sdpa = "math" if "sdpa-math" in levers else "flash" if "sdpa-flash" in levers else None
    build_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), speed.sdpa_backend(sdpa):
            if "chunkce" in levers:  # what `llamalab pretrain` does (train.fused_loss): head + loss fused, chunked
                loss = linear_cross_entropy(model.hidden_states(x), model.output.weight, y,
                                            mm_t=speed.onednn_mm_t if "onednn" in levers else None)
            else:
                out = model(x) if impl == "llamalab" else model(input_ids=x).logits
                loss = F.cross_entropy(out.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    timed = times[spec["warmup"]:]
    # The median step (not the mean) so that one step slowed by another process does not count.
    return {"tok_s": BATCH * SEQ / statistics.median(timed), "step_s": timed, "first_step_s": times[0],
            "build_s": build_s, "losses": losses}


# --------------------------------------------------------------------------- parent


def run_child(spec: dict) -> dict:
    """One measurement in a fresh process."""
    from harness import run_child as run

    return run(__file__, spec, threads=THREADS)


def main() -> None:
    """Interleave the measurements, print the medians table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="15m,135m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--impls", default="llamalab,transformers",
                    help="comma list: transformers, llamalab, llamalab+LEVER+... (levers: " + ", ".join(LEVERS) + ")")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--force-bf16", action="store_true",
                    help="run the bf16 rows even on a CPU without native bf16 (torch emulates it there: ~50x slower)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    sys.path.insert(0, str(ROOT / "src"))
    from llamalab.train.metrics import PEAK_FLOPS, flops_per_token, mfu

    from llamalab.precision import cpu_flags, cpu_name, native_bf16

    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    print(f"CPU: {cpu_name()} ({isa or 'no x86 vector flags'})", file=sys.stderr)
    dtypes = args.dtypes.split(",")
    if "bf16" in dtypes and not native_bf16("cpu") and not args.force_bf16:
        dtypes.remove("bf16")
        print("bf16 rows skipped: this CPU has no native bf16 (no AVX512-BF16 or AMX), torch emulates its "
              "matrix products (~50x slower than fp32); --force-bf16 runs them anyway", file=sys.stderr)
    impls = args.impls.split(",")
    rows = []
    for shape in args.shapes.split(","):
        config = model_config(shape)
        for dtype in dtypes:
            runs: dict[str, list[dict]] = {i: [] for i in impls}
            for r in range(args.rounds):
                order = impls if r % 2 == 0 else impls[::-1]
                for impl in order:
                    m = run_child({"impl": impl, "shape": shape, "dtype": dtype, "steps": args.steps,
                                   "warmup": args.warmup})
                    runs[impl].append(m)
                    print(f"{shape} {dtype} round {r + 1}/{args.rounds} {impl:<28} {m['tok_s']:8.1f} tok/s "
                          f"(first step {m['first_step_s']:.1f} s, loss {m['losses'][0]:.3f})",
                          file=sys.stderr, flush=True)
            def baseline(impl: str) -> float | None:
                # the ratio is against transformers trained the same way: with peft's LoRA for a LoRA row
                ref = "transformers+lora" if "lora" in impl.split("+") else "transformers"
                return statistics.median(m["tok_s"] for m in runs[ref]) if ref in runs else None

            for impl in impls:
                base = baseline(impl)
                tok_s = statistics.median(m["tok_s"] for m in runs[impl])
                step_s = statistics.median(s for m in runs[impl] for s in m["step_s"])
                first = statistics.median(m["first_step_s"] for m in runs[impl])
                peak = peak_name(dtype, impl.split("+")[1:])
                # LoRA: forward + input gradients only for the frozen matrices (4N of 6N)
                fpt = flops_per_token(config, SEQ) * (2 / 3 if "lora" in impl.split("+") else 1)
                rows.append({
                    "shape": shape, "dtype": dtype, "impl": impl, "tok_s": tok_s,
                    "tok_s_runs": [m["tok_s"] for m in runs[impl]], "flops_per_token": fpt,
                    "mfu": mfu(tok_s, fpt, PEAK_FLOPS[peak]), "peak": peak, "peak_flops": PEAK_FLOPS[peak],
                    "mfu_bf16_peak": mfu(tok_s, fpt, PEAK_FLOPS["cpu-dev-bf16"]),
                    # the fastest single step seen: the least disturbed figure on a shared machine
                    "best_tok_s": BATCH * SEQ / min(s for m in runs[impl] for s in m["step_s"]),
                    "ratio_vs_transformers": tok_s / base if base else None,
                    # first step minus a steady step: compile (and first-call allocation) time
                    "first_step_extra_s": first - step_s,
                })

    print(f"\nCPU: {cpu_name()} ({isa}); batch {BATCH}x{SEQ}, {THREADS} threads, AdamW; medians of {args.rounds} fresh processes x "
          f"{args.steps} steps (after {args.warmup} warmup). MFU = tok/s * (6N + 12 L d S) / peak.")
    head = f"{'shape':<6}{'dtype':<6}{'impl':<30}{'tok/s':>9}{'vs HF':>8}{'MFU':>8}  {'peak':<20}{'MFU@bf16':>9}{'best':>8}{'1st-step extra s':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio_vs_transformers']:.2f}x" if r["ratio_vs_transformers"] else "-"
        print(f"{r['shape']:<6}{r['dtype']:<6}{r['impl']:<30}{r['tok_s']:9.1f}{ratio:>8}{100 * r['mfu']:7.1f}%  "
              f"{r['peak']:<20}{100 * r['mfu_bf16_peak']:8.1f}%{r['best_tok_s']:8.0f}{r['first_step_extra_s']:18.1f}")
    if args.json:
        meta = {"batch": BATCH, "seq": SEQ, "threads": THREADS, "steps": args.steps, "warmup": args.warmup,
                "rounds": args.rounds}
        Path(args.json).write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
