"""Quantized products against the rows of x: each kernel path this CPU has, on SmolLM2-135M's shapes.

The cost of a batched decode step (and of prefill) is these products at 2-64 rows of x. For every
path the CPU offers (avx2, avx512vnni, amx) and every row count, the microseconds of one call on a
layer's q|k|v, gate|up and down matrices (Q4_1, as in SmolLM2's own file) and on the tied Q8_0
head, measured in alternation (path after path, round after round), the best round kept; then the
ratio of each path to the best one below it, and the multiply-adds per second.

With ``--cold`` every call reads its own copy of the weights, from a set of copies larger than the
caches (``--cold-mb``, 1024 by default): the weights come from memory, as in a model's step, where
the next layer's weights are never still cached (the default, warm, keeps them in L2/L3).

With ``--tokens`` x is one prompt of that many tokens, ``(1, rows, k)``, as a prefill passes it: on
AMX the bf16 tiles then take it from ``kernels.bf16_min_tokens()`` tokens (a 2-D x, rows of separate
sequences, from 64 rows).

    python benchmarks/qmatmul_rows.py [--rows 1,2,4,8,16,64] [--threads 1] [--rounds 5] [--cold] [--tokens] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llamalab.quant import kernels  # noqa: E402

SHAPES = {  # name: (rows of W, columns, block type, number of weights in one call)
    "qkv": ([576, 192, 192], 576, "Q4_1"),
    "gate|up": ([1536, 1536], 576, "Q4_1"),
    "down": ([576], 1536, "Q4_1"),
    "head": ([49152], 576, "Q8_0"),
}


def _weights(rows: list[int], k: int, type_name: str, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[type_name]
    return [torch.from_numpy(gguf.quants.quantize((rng.standard_normal((r, k)) * 0.05).astype(np.float32), qt))
            for r in rows]


def _time(fn, reps: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i + 1)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    """Print the table (and write JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="read the weights from memory, not from the caches")
    ap.add_argument("--cold-mb", type=int, default=1024)
    ap.add_argument("--tokens", action="store_true",
                    help="x as one prompt of that many tokens, (1, rows, k), as prefill passes it (AMX: bf16 tiles "
                         "from kernels.bf16_min_tokens() tokens); default a 2-D (rows, k), rows of separate sequences")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not kernels.kernel_available():
        sys.exit(f"qmatmul_rows: no kernel here: {kernels.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    isas = kernels.available_isas()
    row_counts = [int(r) for r in args.rows.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {args.threads} thread(s); paths {', '.join(isas)}; best of {args.rounds} rounds; "
          f"{'cold (weights from memory)' if args.cold else 'warm (weights cached)'}; "
          f"x {'(1, rows, k): one prompt' if args.tokens else '(rows, k)'}")
    ws = {name: _weights(rows, k, t, i) for i, (name, (rows, k, t)) in enumerate(SHAPES.items())}
    # copies[name][j]: the j-th copy of the weights (one, warm; cold: enough to overflow the caches)
    copies = {}
    for name, w in ws.items():
        size = sum(t.numel() for t in w)
        count = max(2, args.cold_mb * 2**20 // size) if args.cold else 1
        copies[name] = [w] + [[t.clone() for t in w] for _ in range(count - 1)]
    best: dict[tuple[str, int, str], float] = {}
    # One running count over every call, so that no path reads a copy another path has just cached.
    turn = [0]

    def pick(cs: list) -> list:
        turn[0] += 1
        return cs[turn[0] % len(cs)]
    for _ in range(args.rounds):
        for m in row_counts:
            for name, (rows, k, t) in SHAPES.items():
                x = torch.randn(1, m, k) if args.tokens else torch.randn(m, k)
                for isa in isas:
                    with kernels.use_isa(isa):
                        reps = max(2, int(2e8 / (sum(rows) * k * max(m, 4))))
                        cs = copies[name]
                        s = _time(lambda i: kernels.qmatmul(x, pick(cs), [t] * len(rows)), reps)
                    key = (name, m, isa)
                    best[key] = min(best.get(key, float("inf")), s)
    results = []
    head = f"{'weights':<8} {'rows':>4} " + " ".join(f"{i + ' us':>13}" for i in isas) + f" {'GMAC/s best':>12} {'x prev':>7}"
    print(head)
    for m in row_counts:
        for name, (rows, k, _t) in SHAPES.items():
            us = [best[(name, m, i)] * 1e6 for i in isas]
            macs = sum(rows) * k * m
            top = min(us)
            ratio = us[-2] / us[-1] if len(us) > 1 else 1.0
            print(f"{name:<8} {m:>4} " + " ".join(f"{u:>13.1f}" for u in us) + f" {macs / top / 1e3:>12.1f} {ratio:>7.2f}")
            results.append({"weights": name, "rows_of_x": m, **{f"{i}_us": u for i, u in zip(isas, us)}})
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "tokens": args.tokens, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
