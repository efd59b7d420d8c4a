"""Batch-1 prefill and decode speed on SmolLM2-135M-Instruct: llamalab against HF transformers
(and llama.cpp where llama-cpp-python is installed), 2 threads, fp32 and bf16.

Both sides load the same GGUF (dequantized to the same weights) and see the same 128-token
prompt. Figures: prefill tok/s for the prompt, decode tok/s over 128 greedy new tokens, and
decode GB/s = bytes of weights read per token / seconds per token.

llamalab is measured through the engine's loop (``setup_cache``; prefill with
``input_pos=arange`` and the output head at the last position only; then one token per step
from the static KV cache) on the model that
``llamalab.generate.fast.optimize_for_decode`` returns, and also on the plain model
("llamalab-plain", the path without the opt-in), and with oneDNN's matrix-vector products
instead of llamalab's kernel ("llamalab-onednn"). transformers runs its own cached loop
(``past_key_values``, argmax), prefilling with ``logits_to_keep=1`` as its ``generate()`` does.

Each implementation lives in its own process, loaded once; the parent asks them for one
measurement each in turn (A B C A B C ...), because the shared machine's bandwidth drifts
within minutes. The table gives medians and each row's ratio to transformers.

``--dtypes gguf`` runs the file as stored: llamalab on its Q4_1/Q8_0 blocks (``llamalab.load(path,
dtype=None)``, the quantized kernels of ``llamalab.quant``) against llama.cpp on the same file, the
ratios then to llama.cpp. The table also gives the machine's read bandwidth (a 2-thread sum over
1 GB, best of 5) and each decode's share of it.

Usage: ``python benchmarks/decode.py [--rounds 5] [--dtypes fp32,bf16,gguf] [--json out.json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT_LEN = 128
NEW_TOKENS = 128
THREADS = 2

# A child loads one implementation, warms it up, then answers each "go" line on stdin with one
# JSON line: {"prefill_s", "decode_s", "n_decode", "ids"}.
CHILD = r"""
import json, sys, time
which, path, dtype_name, threads, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
prompt = json.loads(sys.stdin.readline())
if which != "llama.cpp":
    import torch
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "gguf": None}[dtype_name]  # gguf: as stored

if which.startswith("llamalab"):
    import llamalab
    from llamalab.generate.fast import optimize_for_decode
    lm = llamalab.load(path, dtype=dtype)
    if which == "llamalab-plain":
        model = lm.model
    else:
        # llamalab-onednn: the decode steps' products in oneDNN's kernels instead of llamalab's.
        model = optimize_for_decode(lm.model, compile=which == "llamalab+compile",
                                    gemv=False if which == "llamalab-onednn" else None)
    # Float weights and quantized blocks, the tied head counted once.
    tensors = {t.data_ptr(): t for t in [*lm.model.parameters(), *(b for n, b in lm.model.named_buffers()
                                                                    if n.endswith("blocks"))]}.values()
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def measure():
        # The engine's loop: static cache, prefill with input_pos=arange, then one token a step.
        model.setup_cache(max_batch_size=1, max_seq_len=len(prompt) + new)
        try:
            t0 = time.perf_counter()
            # Prefill as the engine does it: the output head at the last position only.
            hidden = model.hidden_states(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            nxt = int(model.output(hidden[:, -1]).float()[0].argmax())
            t1 = time.perf_counter()
            ids, pos = [nxt], len(prompt)
            for _ in range(new):
                logits = model(torch.tensor([[nxt]]), input_pos=torch.tensor([pos]))
                nxt = int(logits[0, -1].argmax())
                ids.append(nxt)
                pos += 1
            t2 = time.perf_counter()
        finally:
            model.clear_cache()
        return t1 - t0, t2 - t1, ids

elif which == "transformers":
    import transformers
    from pathlib import Path
    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype).eval()
    params = {id(q): q for q in model.parameters()}.values()
    weight_bytes = sum(q.numel() * q.element_size() for q in params)

    @torch.inference_mode()
    def measure():
        t0 = time.perf_counter()
        # logits_to_keep=1: the last position's logits only, as transformers' generate() prefills.
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        nxt = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        ids, past = [nxt], out.past_key_values
        for _ in range(new):
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ids

else:  # llama.cpp on the same (quantized) GGUF; its dtype is the file's
    import os
    import llama_cpp.llama_cpp as low
    # llamalab's llama.cpp opener without importing llamalab (which imports torch: two OpenMP users in
    # one process have crashed llama.cpp here).
    import importlib.util, pathlib
    _spec = importlib.util.spec_from_file_location("llamalab_llama_cpp", pathlib.Path(
        importlib.util.find_spec("llamalab").origin).parent / "quant" / "llama_cpp.py")
    _peer = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_peer)
    open_llama_cpp = _peer.open_llama_cpp
    import numpy as np
    llm = open_llama_cpp(path, n_ctx=512, n_threads=threads, n_batch=512)
    weight_bytes = os.path.getsize(path)

    n_vocab = llm.n_vocab()

    def last_argmax():
        # The last position's logits from the context itself: llm.scores holds them only with
        # logits_all=True (it is zeros otherwise, and every argmax would be token 0).
        return int(np.argmax(np.ctypeslib.as_array(low.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def measure():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        nxt = last_argmax()
        t1 = time.perf_counter()
        ids = [nxt]
        for _ in range(new):
            llm.eval([nxt])
            nxt = last_argmax()
            ids.append(nxt)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ids

t_warm = time.perf_counter()
measure()  # warm-up: first-call allocations, oneDNN primitive creation, torch.compile
warmup_s = time.perf_counter() - t_warm
print(json.dumps({"ready": True, "weight_bytes": weight_bytes, "warmup_s": warmup_s}), flush=True)
for line in sys.stdin:
    prefill_s, decode_s, ids = measure()
    print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "n_decode": new, "ids": ids}), flush=True)
"""


class Child:
    """One implementation in its own process, loaded once, measured on request."""

    def __init__(self, which: str, path: str, dtype: str, prompt: list[int]) -> None:
        self.which = which
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(THREADS), "TQDM_DISABLE": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, which, path, dtype, str(THREADS), str(NEW_TOKENS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.proc.stdin.write(json.dumps(prompt) + "\n")
        self.proc.stdin.flush()
        ready = self._read()
        self.weight_bytes, self.warmup_s = ready["weight_bytes"], ready["warmup_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.which} child failed (exit {self.proc.wait()})")
        return json.loads(line)

    def measure(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def prompt_ids(path: str) -> list[int]:
    """A 128-token prompt: English text in the chat template, encoded by llamalab's tokenizer."""
    sys.path.insert(0, "src")
    import llamalab.checkpoint as ck

    tok = ck.read_checkpoint(path).tokenizer
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined movable metal type, oil-based ink and a screw press adapted from wine making. ") * 8
    ids = tok.encode(text)
    if len(ids) < PROMPT_LEN:
        raise SystemExit("prompt text too short")
    return ids[:PROMPT_LEN]


def read_bandwidth() -> float:
    """The machine's read bandwidth in GB/s: a sum over 1 GB of fp32 on THREADS threads, best of 5."""
    import time

    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(256 * 1024 * 1024)  # 1 GB, touched once so no page faults are timed
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def main() -> None:
    """Measure interleaved, print medians and ratios, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-plain", action="store_true", help="skip llamalab's plain (un-optimized) model")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip llamalab+compile (optimize_for_decode(compile=True): ~20-80 s to compile)")
    ap.add_argument("--no-onednn", action="store_true",
                    help="skip llamalab-onednn (the fast path with oneDNN's matrix-vector products instead "
                         "of llamalab's kernel, for comparison)")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="GGUF file (or registered name) to measure, e.g. a Q8_0 file written by "
                         "`llamalab convert smollm2-135m-instruct out/smol-q8_0.gguf --to gguf --type q8_0`")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, "src")
    from llamalab.checkpoint.registry import resolve

    path = str(resolve(args.model))
    prompt = prompt_ids(path)
    results: dict[str, dict[str, dict]] = {}
    dtypes = args.dtypes.split(",")
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    reference: dict[str, str] = {}
    for dtype in dtypes:
        if dtype == "gguf":  # the file as stored: llamalab's quantized kernels against llama.cpp
            peers = (["llamalab"] + ([] if args.no_compile else ["llamalab+compile"])
                     + ([] if args.no_plain else ["llamalab-plain"]) + (["llama.cpp"] if have_llama_cpp else []))
            reference[dtype] = "llama.cpp" if have_llama_cpp else "llamalab-plain"
        else:
            peers = (["llamalab"] + ([] if args.no_compile else ["llamalab+compile"])
                     + ([] if args.no_plain else ["llamalab-plain"])
                     + ([] if args.no_onednn else ["llamalab-onednn"]) + ["transformers"])
            reference[dtype] = "transformers"
            if dtype == "fp32" and have_llama_cpp and "gguf" not in dtypes:
                peers.append("llama.cpp")  # once: it runs the GGUF's own (quantized) weights
        children = {p: Child(p, path, dtype, prompt) for p in peers}
        runs: dict[str, list[dict]] = {p: [] for p in peers}
        try:
            for r in range(args.rounds):
                for p, child in children.items():
                    m = child.measure()
                    runs[p].append(m)
                    print(f"{dtype} round {r + 1}/{args.rounds} {p:<15} prefill {PROMPT_LEN / m['prefill_s']:7.1f} tok/s"
                          f"  decode {m['n_decode'] / m['decode_s']:6.1f} tok/s", file=sys.stderr)
        finally:
            for child in children.values():
                child.close()
        ref_ids = runs[reference[dtype]][0]["ids"]
        results[dtype] = {}
        for p, rs in runs.items():
            prefill = statistics.median(PROMPT_LEN / m["prefill_s"] for m in rs)
            decode = statistics.median(m["n_decode"] / m["decode_s"] for m in rs)
            wb = children[p].weight_bytes
            same = sum(a == b for a, b in zip(rs[0]["ids"], ref_ids))
            results[dtype][p] = {"prefill_tok_s": prefill, "decode_tok_s": decode, "weight_bytes": wb,
                                 "warmup_s": children[p].warmup_s,
                                 "decode_gb_s": wb * decode / 1e9, "reference": reference[dtype],
                                 "tokens_same_as_reference": same,
                                 "runs": [{k: v for k, v in m.items() if k != "ids"} for m in rs]}

    from llamalab.precision import cpu_flags, cpu_name

    bandwidth = read_bandwidth()
    isa = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                   if f in cpu_flags())
    print(f"\nCPU: {cpu_name()} ({isa or 'no x86 vector flags'})")
    print(f"{Path(path).name} (fp32/bf16 rows dequantized, gguf rows as stored), batch 1, "
          f"{THREADS} threads, {PROMPT_LEN}-token prompt, {NEW_TOKENS} greedy new tokens; medians of "
          f"{args.rounds} interleaved rounds; read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'dtype':<6}{'impl':<16}{'prefill tok/s':>14}{'decode tok/s':>13}{'decode GB/s':>12}{'of bw':>7}"
          f"{'ref':>13}{'prefill / ref':>14}{'decode / ref':>13}{'same ids':>10}{'warm-up s':>10}")
    for dtype, per in results.items():
        ref = per[reference[dtype]]
        for p, m in per.items():
            print(f"{dtype if p != 'llama.cpp' else 'gguf':<6}{p:<16}{m['prefill_tok_s']:>14.1f}{m['decode_tok_s']:>13.1f}"
                  f"{m['decode_gb_s']:>12.1f}{m['decode_gb_s'] / bandwidth:>7.0%}{reference[dtype]:>13}"
                  f"{m['prefill_tok_s'] / ref['prefill_tok_s']:>14.2f}{m['decode_tok_s'] / ref['decode_tok_s']:>13.2f}"
                  f"{m['tokens_same_as_reference']:>6}/{NEW_TOKENS + 1}{m['warmup_s']:>10.1f}")
    if "fp32" in results and "bf16" in results:
        for p in results["bf16"]:
            if p in results["fp32"]:
                print(f"{p}: bf16 / fp32 decode {results['bf16'][p]['decode_tok_s'] / results['fp32'][p]['decode_tok_s']:.2f}x,"
                      f" prefill {results['bf16'][p]['prefill_tok_s'] / results['fp32'][p]['prefill_tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "cpu_flags": isa, "read_gb_s": bandwidth,
                                               **results}, indent=2))


if __name__ == "__main__":
    main()
