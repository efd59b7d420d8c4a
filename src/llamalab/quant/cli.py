"""`llamalab quantize`: any checkpoint -> a quantized GGUF file or GPTQ directory, by round-to-nearest or GPTQ."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q3_k")

EPILOG = """\
examples:
  llamalab quantize smollm2-135m-instruct out/smol-q4_0.gguf --type q4_0
  llamalab quantize out/smollm2-hf out/smol-gptq-q3_k.gguf --type q3_k --gptq --calib data/calib.txt
  llamalab quantize ./Llama-2-7b out/llama2-gptq-q4_k.gguf --type q4_k --gptq --calib data/tokens/ \\
      --calib-samples 128 --calib-seq-len 2048 --report out/llama2-gptq.json
  llamalab quantize smollm2-135m-instruct out/smol-gptq-3bit --format gptq --bits 3 --group-size 64 \\
      --gptq --calib data/calib.txt

--format gguf: the bits and group size come from the GGUF type: q8_0 8 bits, q4_0/q4_1 4 bits, in groups of 32
weights; q4_k 4 bits and q3_k 3 bits in super-blocks of 256 (sub-blocks of 32 and 16 with 6-bit
scales); where a matrix's rows are not whole super-blocks (SmolLM2's 576-wide inputs) q4_k falls
back to q5_0 (as llama.cpp's quantizer does) and q3_k to q4_0. The embedding (and tied head) is rounded to nearest in --embedding-type (default q8_0,
as llama.cpp keeps it above the layers' type). The file runs in llamalab (q8_0/q4_0/q4_1 on its
quantized kernels) and in llama.cpp. --format gptq writes the HF directory of AutoGPTQ /
transformers (qweight, qzeros, scales, g_idx; --bits and --group-size; embedding and norms fp16),
which llamalab reads back (dequantized at load).
"""


def calibration_tokens(sources: list[str], tokenizer: Any, vocab_size: int, n: int, seq_len: int,
                       seed: int = 0) -> Any:
    """``n`` windows of ``seq_len`` token ids (a LongTensor (n, seq_len)) drawn at seeded random offsets
    from ``sources``: text files (.txt, or .jsonl with a "text" field, each document BOS-prefixed)
    or token shards (a directory of them, or NAME.json), concatenated in order."""
    import numpy as np
    import torch

    from llamalab.data.shards import find_shards, read_shard
    from llamalab.textio import read_documents

    parts: list[np.ndarray] = []
    for src in sources:
        p = Path(src)
        if p.is_dir() or p.name.endswith((".json", ".tokens", ".docs.npy")):
            for shard_path in find_shards(p):
                shard = read_shard(shard_path)
                if shard.vocab_size > vocab_size:
                    raise ValueError(f"{shard_path}: tokenized with a vocabulary of {shard.vocab_size}, larger than "
                                     f"the model's {vocab_size}: not this model's tokens")
                parts.append(np.asarray(shard.tokens, dtype=np.int64))
        else:
            if tokenizer is None:
                raise ValueError(f"--calib {p}: text needs the checkpoint's tokenizer, and it has none "
                                 f"(give token shards instead)")
            for text in read_documents(p, "calibration text: .txt, .jsonl or token shards"):
                if text.strip():
                    parts.append(np.asarray(tokenizer.encode(text, bos=tokenizer.bos_id is not None), dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size < seq_len + 1:
        raise ValueError(f"--calib: {stream.size} tokens in {', '.join(sources)}; need at least --calib-seq-len "
                         f"{seq_len} (GPTQ's paper uses 128 windows of 2048)")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - seq_len + 1, size=n)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a checkpoint into a GGUF file or a GPTQ directory."""
    import torch

    from llamalab.checkpoint import build_model, read_checkpoint
    from llamalab.quant.gptq import LINEARS, gptq_model
    from llamalab.quant.grids import block_format, format_for, gptq_format

    t0 = time.perf_counter()
    dst = Path(args.dest)
    if dst.exists():
        raise ValueError(f"{dst}: already exists; quantize does not overwrite")
    gguf_out = args.format == "gguf"
    if gguf_out and args.type is None:
        raise ValueError("--type is needed for --format gguf (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q3_k)")
    if not gguf_out and args.type is not None:
        raise ValueError("--type is for --format gguf; --format gptq takes --bits and --group-size")
    if args.calib and not args.gptq:
        raise ValueError("--calib is for --gptq (round-to-nearest needs no calibration)")
    if args.gptq and not args.calib:
        raise ValueError("--gptq needs calibration text: --calib FILE.txt|FILE.jsonl|SHARDS_DIR")
    if args.calib_samples < 1 or args.calib_seq_len < 16:
        raise ValueError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = read_checkpoint(args.source)
    c = ckpt.config
    if gguf_out:
        fmt = block_format(args.type)
        for width in (c.dim, c.ffn_hidden_dim):
            format_for(fmt.name, width)  # a clear error before any work
        emb_fmt = format_for(args.embedding_type, c.dim)
        target: Any = fmt.name  # per matrix: the type, or its fallback
        label = fmt.name
    else:
        bad = [w for w in (c.dim, c.ffn_hidden_dim) if w % args.group_size]
        if bad:
            raise ValueError(f"--group-size {args.group_size} does not divide the model's input widths "
                             f"({c.dim}, {c.ffn_hidden_dim}); pick a divisor such as 64 or 32")
        fmt = target = gptq_format(args.bits, args.group_size, args.sym)
        label = fmt.name
    model = build_model(ckpt, dtype=torch.float32)
    tensors: dict[str, Any] = {}
    report: dict[str, Any] = {"source": str(ckpt.path), "format": args.format, "type": label,
                              "method": "gptq" if args.gptq else "rtn"}
    with torch.no_grad():
        if args.gptq:
            calib = calibration_tokens(args.calib, ckpt.tokenizer, c.vocab_size, args.calib_samples,
                                       args.calib_seq_len, args.seed)
            if calib.shape[1] > c.max_seq_len:
                raise ValueError(f"--calib-seq-len {calib.shape[1]}: longer than the model's context {c.max_seq_len}")
            results = gptq_model(model, calib, target, act_order=not args.no_act_order, damp=args.damp,
                                 progress=not args.quiet)
            gptq_err = rtn_err = 0.0
            for name, res in results.items():
                tensors[name] = (res.blocks, res.type_name)
                gptq_err += res.error
                rtn_err += res.rtn_error
            report.update(calibration={"sources": list(args.calib), "samples": int(calib.shape[0]),
                                       "seq_len": int(calib.shape[1]), "seed": args.seed},
                          act_order=not args.no_act_order, damp=args.damp,
                          output_error={"gptq": gptq_err, "rtn": rtn_err, "ratio": gptq_err / rtn_err if rtn_err else None})
        else:
            for i, layer in enumerate(model.layers):
                for n in LINEARS:
                    lin = layer.get_submodule(n)
                    f = format_for(fmt.name, lin.in_features) if gguf_out else fmt
                    tensors[f"layers.{i}.{n}.weight"] = (f.rtn(lin.weight)[0], f.name)
        if gguf_out:
            report["embedding_type"] = emb_fmt.name
            tensors["tok_embeddings.weight"] = (emb_fmt.rtn(model.tok_embeddings.weight)[0], emb_fmt.name)
            if not c.tie_embeddings:
                tensors["output.weight"] = (emb_fmt.rtn(model.output.weight)[0], emb_fmt.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if gguf_out:
        from llamalab.checkpoint.gguf_write import write_gguf

        write_gguf(ckpt, dst, args.type, tensors=tensors)
    else:
        from llamalab.quant.gptq_format import write_gptq

        write_gptq(ckpt, dst, {k: v for k, (v, _) in tensors.items()}, bits=args.bits, group_size=args.group_size,
                   sym=args.sym, desc_act=bool(args.gptq and not args.no_act_order),
                   damp=args.damp if args.gptq else None)
    size = _dir_bytes(dst)
    counts = Counter(t for _, t in tensors.values())
    report.update(dest=str(dst), bytes=size, tensors=dict(counts), seconds=round(time.perf_counter() - t0, 1))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        what = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        extra = ""
        if args.gptq and report["output_error"]["ratio"] is not None:
            extra = (f"; calibration output error {report['output_error']['ratio']:.3f}x round-to-nearest's "
                     f"({report['output_error']['gptq']:.4g} vs {report['output_error']['rtn']:.4g})")
        print(f"wrote {dst}: {size / 2**20:.1f} MiB, {what} ({report['method']}, "
              f"{report['seconds']:.0f} s){extra}", file=sys.stderr)
    return 0


def add_quantize_parser(sub: Any) -> None:
    """Register ``llamalab quantize``."""
    p = sub.add_parser("quantize", help="quantize a checkpoint into a GGUF file (round-to-nearest or GPTQ)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read any checkpoint llamalab reads and write a GGUF file whose layer matrices "
                                   "are in --type blocks: rounded to nearest, or with --gptq by GPTQ (Frantar et "
                                   "al. 2022; layer by layer, Hessians from --calib text, act-order).",
                       epilog=EPILOG)
    p.add_argument("source", help="checkpoint path or registered name")
    p.add_argument("dest", help="output .gguf file, or directory for --format gptq (must not exist)")
    p.add_argument("--format", choices=["gguf", "gptq"], default="gguf",
                   help="gguf (llama.cpp's file, default) or gptq (AutoGPTQ / transformers' HF directory)")
    p.add_argument("--type", default=None, choices=QUANT_TYPES, help="--format gguf: the layers' block type")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="--format gptq: bits per weight (4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="--format gptq: inputs sharing a scale and zero (default 128; it must divide the widths)")
    p.add_argument("--sym", action="store_true", help="--format gptq: symmetric grid (zero fixed at the middle)")
    p.add_argument("--embedding-type", default="q8_0", choices=QUANT_TYPES,
                   help="the embedding's (and untied head's) block type, rounded to nearest (default q8_0)")
    p.add_argument("--gptq", action="store_true", help="GPTQ instead of round-to-nearest (needs --calib)")
    p.add_argument("--calib", action="append", default=None, metavar="PATH",
                   help="calibration data: .txt / .jsonl text or token shards (repeatable)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128, as the paper)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512; the paper 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows' offsets (default 0)")
    p.add_argument("--no-act-order", action="store_true",
                   help="round columns in their order, not by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="dampening, a fraction of the mean diagonal (0.01)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--report", default=None, help="also write a JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_quantize)


__all__ = ["QUANT_TYPES", "add_quantize_parser", "calibration_tokens", "cmd_quantize"]
