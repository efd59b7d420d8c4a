"""Rejection sampling's generation: K samples per prompt on SmolLM2-135M-Instruct, llamalab's
engine against HF transformers' ``generate(num_return_sequences=K)``, 2 threads.

Both sides load the same GGUF (dequantized to the same weights), render the same chat prompts
(addition questions, as ``make rlhf-demo`` samples), sample K answers per prompt at the same
temperature with no top-k/top-p filter and the same stop ids and token limit. llamalab runs
``Generator.generate([prompt] * K)`` (what ``llamalab rejection-sample`` does per prompt and
temperature: one prefill for the K rows, finished rows leave the batch); transformers runs
``model.generate(prompt, do_sample=True, num_return_sequences=K)``. The figures: samples/s and
generated tokens/s (tokens up to and including each sample's stop token). The draws differ (each
library has its own sampler), so the answer lengths differ a little; tok/s is the fairer ratio.

Each measurement is a fresh process (load, warm up on one prompt, then time all prompts), and
the two sides alternate (A B A B ...), because the shared machine drifts within minutes.

Usage: ``python benchmarks/rejection.py [--rounds 2] [--prompts 8] [--k 16] [--dtype fp32] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_child  # noqa: E402

THREADS = 2


def child(spec: dict) -> dict:
    """Load one side, warm up, sample K answers for each prompt; return the counts and the time."""
    import time

    import torch

    torch.set_num_threads(THREADS)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    import llamalab
    from llamalab.finetune.datasets import arithmetic_prompts
    from llamalab.generate.chat import chat_stop_ids, encode_chat

    lm = llamalab.load("smollm2-135m-instruct", dtype=dtype)
    tok = lm.tokenizer
    stops = sorted(chat_stop_ids(tok))
    prompts = [encode_chat(tok, [{"role": "user", "content": q["prompt"]}])
               for q in arithmetic_prompts(spec["prompts"] + 1, offset=600, ops="+", high=30)]
    k, new, temp = spec["k"], spec["max_new_tokens"], spec["temperature"]
    if spec["which"] == "llamalab":
        from llamalab.generate.engine import GenerationConfig, Generator

        gen = Generator(lm.model, tok)

        def sample(ids: list[int], seed: int) -> list[int]:
            cfg = GenerationConfig(max_new_tokens=new, temperature=temp, seed=seed, stop_ids=tuple(stops))
            return [len(r.ids) for r in gen.generate([ids] * k, cfg)]
    else:
        import transformers

        path = Path(lm.path)
        del lm
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()

        @torch.inference_mode()
        def sample(ids: list[int], seed: int) -> list[int]:
            torch.manual_seed(seed)
            out = model.generate(torch.tensor([ids]), do_sample=True, temperature=temp, top_k=0, top_p=1.0,
                                 num_return_sequences=k, max_new_tokens=new, eos_token_id=stops,
                                 pad_token_id=stops[0])[:, len(ids):].tolist()
            lengths = []
            for row in out:
                ends = [i for i, t in enumerate(row) if t in stops]
                lengths.append(ends[0] + 1 if ends else len(row))
            return lengths

    sample(prompts[0], 0)  # warm-up: allocations, oneDNN primitives
    t0 = time.perf_counter()
    tokens = samples = 0
    for i, ids in enumerate(prompts[1:], start=1):
        lengths = sample(ids, i)
        tokens += sum(lengths)
        samples += len(lengths)
    return {"seconds": time.perf_counter() - t0, "samples": samples, "tokens": tokens}


def main() -> None:
    """Alternate the two sides for ``--rounds`` rounds; print a table of medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--json", metavar="FILE", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    spec = {"prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "dtype": args.dtype}
    runs: dict[str, list[dict]] = {"llamalab": [], "transformers": []}
    for r in range(args.rounds):
        for which in runs:
            res = run_child(__file__, {**spec, "which": which}, threads=THREADS, label=which)
            runs[which].append(res)
            print(f"round {r + 1} {which}: {res['samples'] / res['seconds']:.2f} samples/s, "
                  f"{res['tokens'] / res['seconds']:.1f} tok/s", file=sys.stderr, flush=True)
    table = {}
    for which, rs in runs.items():
        table[which] = {"samples_per_s": statistics.median(x["samples"] / x["seconds"] for x in rs),
                        "tok_per_s": statistics.median(x["tokens"] / x["seconds"] for x in rs),
                        "mean_tokens": statistics.mean(x["tokens"] / x["samples"] for x in rs)}
    base = table["transformers"]
    print(f"{args.prompts} prompts x K={args.k}, T={args.temperature}, <= {args.max_new_tokens} tokens, "
          f"{args.dtype}, {THREADS} threads, median of {args.rounds}")
    print("| | samples/s | tok/s | tokens per sample | tok/s vs transformers |")
    print("|---|---|---|---|---|")
    for which, t in table.items():
        print(f"| {which} | {t['samples_per_s']:.2f} | {t['tok_per_s']:.1f} | {t['mean_tokens']:.1f} | "
              f"{t['tok_per_s'] / base['tok_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "runs": runs, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
