"""Llama 3's document mask two ways: a dense boolean S x S mask into one SDPA call, or
``DocumentMask`` (per-document causal attention, no S x S tensor), forward + backward of a
1-layer model's attention at 4K and 8K positions, documents of a given mean length.

Each case runs in its own process so its peak RSS is its own; times are the median of
``--repeats`` steps after a warm-up. Prints a table and, with ``--json``, the rows.

    python benchmarks/document_mask.py                      # 4096, 8192; documents ~1024 tokens
    python benchmarks/document_mask.py --lengths 8192 --mean-doc 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def case(seqlen: int, impl: str, mean_doc: int, repeats: int, heads: int, head_dim: int) -> dict:
    """One (length, implementation) case, in this process."""
    import torch

    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=heads * head_dim, n_layers=1, n_heads=heads, n_kv_heads=heads // 2, vocab_size=512,
                      multiple_of=64, max_seq_len=seqlen)
    model = Transformer(cfg)
    model.init_weights()
    model.document_attention = impl
    gen = torch.Generator().manual_seed(1)
    lengths, total = [], 0
    while total < seqlen:  # exponential document lengths (most documents short, a few long)
        n = max(1, int(torch.empty(1).exponential_(1.0 / mean_doc, generator=gen).item()))
        n = min(n, seqlen - total)
        lengths.append(n)
        total += n
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    tokens = torch.randint(0, 512, (1, seqlen), generator=gen)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        model(tokens, doc_ids=doc_ids).sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seq_len": seqlen, "impl": impl, "documents": len(lengths), "step_s": statistics.median(times),
            "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base_rss) / 1024}


def main() -> int:
    """Run every case in a subprocess and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--mean-doc", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("--case", nargs=2, metavar=("LEN", "IMPL"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.case:
        print(json.dumps(case(int(a.case[0]), a.case[1], a.mean_doc, a.repeats, a.heads, a.head_dim)))
        return 0
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        for impl in ("dense", "segments"):
            out = subprocess.run([sys.executable, __file__, "--case", str(n), impl, "--mean-doc", str(a.mean_doc),
                                  "--repeats", str(a.repeats), "--heads", str(a.heads), "--head-dim",
                                  str(a.head_dim)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['seq_len']:>6}  {r['impl']:<9} {r['documents']:>4} docs  fwd+bwd {r['step_s'] * 1e3:8.1f} ms  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['rss_growth_mb']:.0f} MB in the steps)", flush=True)
    for n in sorted({r["seq_len"] for r in rows}):
        d, s = (next(r for r in rows if r["seq_len"] == n and r["impl"] == i) for i in ("dense", "segments"))
        print(f"{n}: segments {d['step_s'] / s['step_s']:.2f}x the dense mask's speed, "
              f"{s['rss_growth_mb']:.0f} vs {d['rss_growth_mb']:.0f} MB of growth")
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
