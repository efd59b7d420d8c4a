"""Time and peak memory to load SmolLM2-135M-Instruct (Q4_1 GGUF) into an fp32 model, ready to run:
llamalab against transformers' own GGUF loader (and llama.cpp where llama-cpp-python is installed).

Each load runs in a fresh process (so imports, page cache effects and ``ru_maxrss`` are its
own), alternating A B A B ... because the machine's speed drifts; the figures are medians,
and the table gives each peer's ratio to llamalab measured in this same run.

Usage: ``python benchmarks/load_time.py [--rounds 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys

# Each child prints one JSON line: seconds from the first import to a model ready to run,
# the seconds spent importing, and the process's peak RSS.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
which, path = sys.argv[1], sys.argv[2]
if which == "llamalab":
    import torch, llamalab
    t_imp = time.perf_counter()
    lm = llamalab.load(path)
    tok = lm.tokenizer
elif which == "transformers":
    import torch, transformers
    from pathlib import Path
    t_imp = time.perf_counter()
    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
else:
    import llama_cpp
    t_imp = time.perf_counter()
    model = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "import_s": t_imp - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_one(which: str, path: str) -> dict[str, float]:
    """Load once in a fresh process and return its figures."""
    proc = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True,
                          env={"PYTHONWARNINGS": "ignore", **os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Measure, print a table of medians and ratios, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    sys.path.insert(0, "src")
    from llamalab.checkpoint.registry import resolve

    path = str(resolve("smollm2-135m-instruct"))
    peers = ["llamalab", "transformers"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in peers}
    for r in range(args.rounds):
        for p in peers:
            runs[p].append(run_one(p, path))
            print(f"round {r + 1}/{args.rounds} {p}: {runs[p][-1]['seconds']:.2f} s", file=sys.stderr)
    med = {p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in runs.items()}
    base = med["llamalab"]
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF -> ready fp32 model, median of {args.rounds} fresh processes")
    print(f"{'loader':<14}{'total s':>9}{'import s':>10}{'peak RSS MB':>13}{'time / llamalab':>17}{'RSS / llamalab':>16}")
    for p, m in med.items():
        print(f"{p:<14}{m['seconds']:>9.2f}{m['import_s']:>10.2f}{m['peak_rss_mb']:>13.0f}"
              f"{m['seconds'] / base['seconds']:>17.2f}{m['peak_rss_mb'] / base['peak_rss_mb']:>16.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": med, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
