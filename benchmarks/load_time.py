"""Time and peak memory to load SmolLM2-135M-Instruct (Q4_1 GGUF), ready to run: llamalab kept in its
blocks ("llamalab-q": ``llamalab.load(path, dtype=None)``, the quantized kernels loaded) and dequantized
to fp32 ("llamalab-fp32"), against transformers' own GGUF loader (fp32) and llama.cpp where
llama-cpp-python is installed (the file as stored).

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

# Each child prints one JSON line: seconds from the first import to a model ready to run, the
# seconds spent importing, the load alone (the rest), and the process's peak RSS.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
which, path = sys.argv[1], sys.argv[2]
if which == "llamalab-q":
    import torch, llamalab
    t_imp, rss_imp = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lm = llamalab.load(path, dtype=None)
    from llamalab.quant import kernels
    kernels.kernel_available()  # the kernel library loaded (built once beforehand, cached)
    tok = lm.tokenizer
elif which == "llamalab-fp32":
    import torch, llamalab
    t_imp, rss_imp = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lm = llamalab.load(path, dtype=torch.float32)
    tok = lm.tokenizer
elif which == "transformers":
    import torch, transformers
    from pathlib import Path
    t_imp, rss_imp = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
else:
    # llamalab's llama.cpp opener without importing llamalab (which imports torch: two OpenMP users in
    # one process have crashed llama.cpp here).
    import importlib.util, pathlib
    _spec = importlib.util.spec_from_file_location("llamalab_llama_cpp", pathlib.Path(
        importlib.util.find_spec("llamalab").origin).parent / "quant" / "llama_cpp.py")
    _peer = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_peer)
    open_llama_cpp = _peer.open_llama_cpp
    t_imp, rss_imp = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = open_llama_cpp(path, n_ctx=512)
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": t1 - t0, "import_s": t_imp - t0, "load_s": t1 - t_imp,
                  "peak_rss_mb": peak / 1024, "load_rss_mb": (peak - rss_imp) / 1024}))
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
    peers = ["llamalab-q", "llamalab-fp32", "transformers"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    run_one("llamalab-q", path)  # builds the kernels once if this machine has not yet (not timed)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in peers}
    for r in range(args.rounds):
        for p in peers:
            runs[p].append(run_one(p, path))
            print(f"round {r + 1}/{args.rounds} {p}: {runs[p][-1]['seconds']:.2f} s", file=sys.stderr)
    med = {p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in runs.items()}
    base = med["llamalab-q"]
    file_mb = os.path.getsize(path) / 2**20
    from llamalab.precision import cpu_name

    print(f"\nCPU: {cpu_name()}. SmolLM2-135M-Instruct Q4_1 GGUF ({file_mb:.0f} MiB) -> a model ready to run, "
          f"median of {args.rounds} fresh processes")
    # "load RSS": the peak RSS the load adds to what the imports reached (torch alone is ~300 MB).
    print(f"{'loader':<15}{'total s':>9}{'import s':>10}{'load s':>8}{'peak RSS MB':>13}{'load RSS MB':>13}"
          f"{'load RSS / file':>17}{'load / llamalab-q':>19}")
    for p, m in med.items():
        print(f"{p:<15}{m['seconds']:>9.2f}{m['import_s']:>10.2f}{m['load_s']:>8.2f}{m['peak_rss_mb']:>13.0f}"
              f"{m['load_rss_mb']:>13.0f}{m['load_rss_mb'] / file_mb:>17.2f}{m['load_s'] / base['load_s']:>19.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": med, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
