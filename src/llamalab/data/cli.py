"""`llamalab tokenize`: the argument parser and command of the tokenization step."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["add_tokenize_parser", "cmd_tokenize"]

TOKENIZE_EPILOG = """\
example:
  llamalab tokenize data/*.jsonl --tokenizer tok/llama.model --out data/tokens
  llamalab tokenize books/*.txt --tokenizer tok/llama.model --out data/books --num-workers 8
"""


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenize the inputs into shards; print a summary on stderr. Bad input raises DataError (a ValueError)."""
    from .shards import read_shard
    from .tokenize import tokenize_files

    t0 = time.perf_counter()
    paths = tokenize_files(args.inputs, args.tokenizer, args.out, shard_tokens=args.shard_tokens,
                           text_field=args.text_field, split_lines=args.split_lines,
                           num_workers=args.num_workers, prefix=args.prefix, progress=not args.quiet)
    shards = [read_shard(p) for p in paths]
    n_tokens = sum(s.n_tokens for s in shards)
    n_docs = sum(s.n_documents for s in shards)
    print(f"wrote {len(paths)} shard(s) to {args.out}: {n_docs:,} documents, {n_tokens:,} tokens "
          f"({shards[0].tokens.dtype.name}, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def add_tokenize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `tokenize` to the `llamalab` sub-commands; returns its parser."""
    from . import DEFAULT_SHARD_TOKENS  # not from .shards: that imports numpy

    p = subparsers.add_parser(
        "tokenize", help="tokenize .txt/.jsonl files into packed token shards",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOKENIZE_EPILOG,
        description="Encode every document with bos and eos (as LLaMA does) into packed shards: NAME.tokens "
                    "(uint16/uint32 ids), NAME.docs.npy (document offsets), NAME.json (metadata). "
                    ".jsonl: one document per line; .txt: one document per file (or per line with --split-lines).")
    p.add_argument("inputs", nargs="+", help=".txt or .jsonl files")
    p.add_argument("--tokenizer", required=True, help="tokenizer file or directory (tokenizer.model, tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory (new, or without shards of this --prefix)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"start a new shard after this many tokens (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--split-lines", action="store_true", help=".txt inputs: every non-empty line is a document")
    p.add_argument("--num-workers", type=int, default=0,
                   help="encoding processes (default 0: in this process); the shards are the same either way")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_tokenize)
    return p
