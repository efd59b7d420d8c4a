"""Peak memory of loading a 2-shard Meta checkpoint: llamalab's lazy merge against the naive one.

Writes a random mid-size LLaMA (``--size-m`` million parameters) in Meta's layout, split
in ``--shards`` model-parallel shards, once per shard dtype (bf16 as Meta ships, and fp32).
Then, for each method, a fresh Python process imports torch, notes its RSS, loads the
checkpoint into an fp32 model and reports its peak RSS (``ru_maxrss``) minus that
baseline, as a ratio of the fp32 model's size:

* ``llamalab``: ``read_meta`` (shards memory-mapped, each tensor merged on demand, read
  pages released) + ``build_model``;
* ``llamalab, pages kept``: the same with the page release switched off, to show what it buys;
* ``naive``: ``torch.load`` of every shard into memory, ``torch.cat`` of each tensor into
  a full state dict, then the same ``build_model``.

The driver itself never imports torch and writes the checkpoints from a subprocess too:
on Linux a child's ``ru_maxrss`` starts from its parent's peak (``execve`` carries the
high-water mark over), so a parent holding a model would hide the children's figures.
The children cross-check ``ru_maxrss`` against ``VmHWM`` from ``/proc/self/status``.

Usage: ``python benchmarks/load_memory.py [--size-m 400] [--shards 2] [--dtypes bf16,fp32]``
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DTYPES = ["bf16", "fp16", "fp32"]
METHODS = ["llamalab", "llamalab-pages-kept", "naive"]
LABELS = {"llamalab": "llamalab read_meta + build_model", "llamalab-pages-kept": "llamalab, mapped pages kept",
          "naive": "naive torch.load + torch.cat"}


def config_for(size_m: float) -> Any:
    """A LLaMA-shaped ModelConfig of about ``size_m`` million parameters (dim 1024, 32k vocabulary)."""
    from llamalab.config import ModelConfig

    base = ModelConfig(dim=1024, n_layers=1, n_heads=16, vocab_size=32000, multiple_of=256, max_seq_len=2048)
    per_layer = base.num_params() - base.replace(n_layers=0).num_params()
    fixed = base.replace(n_layers=0).num_params()
    n_layers = max(1, round((size_m * 1e6 - fixed) / per_layer))
    return base.replace(n_layers=n_layers)


def write_checkpoint(size_m: float, dst: Path, n_shards: int, dtype_name: str) -> None:
    """Random weights (std 0.02, unit norms) written with llamalab's Meta writer."""
    import torch

    from llamalab.checkpoint.base import expected_shapes
    from llamalab.checkpoint.meta import write_meta

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    config = config_for(size_m)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            sd[name] = torch.ones(shape, dtype=dtype)
        else:
            sd[name] = torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
    write_meta(config, sd, dst, n_shards=n_shards)


def _rss_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _vm_hwm_bytes() -> int | None:
    """Peak RSS of this process from /proc (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(method: str, folder: Path) -> None:
    """Run in a fresh interpreter: load ``folder`` one way and print a JSON line of figures."""
    import gc

    import torch

    from llamalab.checkpoint import meta
    from llamalab.checkpoint.base import Checkpoint, build_model

    gc.collect()
    baseline, baseline_hwm = _rss_peak_bytes(), _vm_hwm_bytes()
    t0 = time.perf_counter()
    if method in ("llamalab", "llamalab-pages-kept"):
        if method == "llamalab-pages-kept":
            meta._MADVISE = None
        ckpt = meta.read_meta(folder)
        model = build_model(ckpt)
    elif method == "naive":
        ckpt = meta.read_meta(folder)  # for the config and split dims only: tensors are not touched
        dims = {k: meta.shard_dim(k, vocab_parallel_embedding=ckpt.metadata["embedding_split"] == "vocab")
                for k in ckpt.state_dict}
        shards = [torch.load(folder / f, map_location="cpu", weights_only=True) for f in ckpt.metadata["shard_files"]]
        merged = {k: shards[0][k] if d is None else torch.cat([s[k] for s in shards], dim=d) for k, d in dims.items()}
        del shards
        model = build_model(Checkpoint(config=ckpt.config, state_dict=merged, tokenizer=None, format="meta",
                                       path=folder))
        del merged
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - t0
    peak, peak_hwm = _rss_peak_bytes(), _vm_hwm_bytes()
    fingerprint = sum(float(p.double().sum()) for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"method": method, "baseline": baseline, "peak": peak, "baseline_hwm": baseline_hwm,
                      "peak_hwm": peak_hwm, "seconds": seconds, "fingerprint": fingerprint,
                      "n_params": n_params}))


def _run_self(*args: str) -> str:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def measure(method: str, folder: Path) -> dict[str, Any]:
    """Run :func:`child` in a new process and parse its figures."""
    return json.loads(_run_self("--child", method, str(folder)).strip().splitlines()[-1])


def _size_line(size_m: float) -> tuple[str, int]:
    """Describe the model (computed in a subprocess: the driver keeps torch out of its memory)."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from load_memory import config_for; "
            "c = config_for(float(sys.argv[2])); "
            "print(json.dumps([c.dim, c.n_layers, c.vocab_size, c.num_params()]))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(size_m)], check=True,
                         capture_output=True, text=True)
    dim, n_layers, vocab, n_params = json.loads(out.stdout)
    return f"dim {dim}, {n_layers} layers, vocab {vocab}: {n_params / 1e6:.1f}M params", n_params


def main() -> None:
    """Parse arguments, write the checkpoints, measure every method, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-m", type=float, default=400.0, help="model size in millions of parameters")
    ap.add_argument("--shards", type=int, default=2, help="model-parallel shards to write")
    ap.add_argument("--dtypes", default="bf16,fp32", help="shard dtypes to try, comma-separated")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--write", nargs=2, metavar=("DTYPE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if args.write:
        write_checkpoint(args.size_m, Path(args.write[1]), args.shards, args.write[0])
        return

    desc, n_params = _size_line(args.size_m)
    model_bytes = n_params * 4
    work = Path(tempfile.mkdtemp(prefix="llamalab-load-memory-", dir=args.workdir))
    print(f"model: {desc}, {model_bytes / 2**30:.2f} GiB in fp32; {args.shards} shards")
    rows = []
    try:
        for dname in args.dtypes.split(","):
            folder = work / dname
            t0 = time.perf_counter()
            if dname not in DTYPES:
                raise SystemExit(f"--dtypes: unknown {dname!r}; expected some of {DTYPES}")
            _run_self("--write", dname, str(folder), "--size-m", str(args.size_m), "--shards", str(args.shards))
            disk = sum(f.stat().st_size for f in folder.glob("consolidated.*.pth"))
            print(f"wrote {dname} shards ({disk / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
            fingerprints = set()
            for method in METHODS:
                r = measure(method, folder)
                fingerprints.add(round(r["fingerprint"], 3))
                rows.append((dname, method, r))
            if len(fingerprints) != 1:
                raise SystemExit(f"methods built different models from {folder}: {fingerprints}")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'shards':<7}{'method':<34}{'peak RSS - baseline':>20}{'x fp32 model':>14}"
          f"{'(VmHWM)':>9}{'time':>8}")
    for dname, method, r in rows:
        delta = r["peak"] - r["baseline"]
        hwm = (f"{(r['peak_hwm'] - r['baseline_hwm']) / model_bytes:>8.2f}x" if r["peak_hwm"] is not None
               else f"{'-':>9}")
        print(f"{dname:<7}{LABELS[method]:<34}{delta / 2**30:>16.2f} GiB{delta / model_bytes:>13.2f}x"
              f"{hwm}{r['seconds']:>7.1f}s")
    print(f"(baseline: interpreter with torch and llamalab imported, "
          f"{rows[0][2]['baseline'] / 2**20:.0f} MiB; time includes md5 verification)")


if __name__ == "__main__":
    main()
