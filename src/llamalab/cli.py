"""`llamalab <command>`: thin argument parsing over the library; errors are one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "smollm2-135m-instruct"

MAIN_EPILOG = """\
examples:
  llamalab generate --chat "Name three primary colours."
  llamalab info smollm2-135m-instruct
  llamalab convert smollm2-135m-instruct out/smollm2-hf --to hf
  llamalab tokenizer train corpus.jsonl --vocab-size 32000 --out tok/llama
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _dtype(name: str):  # noqa: ANN202 - torch imported lazily to keep --help fast
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype {name!r}: expected one of {', '.join(table)}")
    return table[name]


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's format, config, parameter count and memory needs."""
    from llamalab.checkpoint import describe

    info = describe(args.source)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert between checkpoint formats."""
    from llamalab.checkpoint import read_checkpoint, write_checkpoint

    t0 = time.perf_counter()
    ckpt = read_checkpoint(args.source)
    dst = write_checkpoint(ckpt, args.dest, to=args.to, n_shards=args.shards)
    print(f"wrote {args.to} checkpoint to {dst} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a SentencePiece BPE tokenizer the LLaMA way."""
    from llamalab.tokenizer import train_sentencepiece

    out = train_sentencepiece(args.inputs, args.out, vocab_size=args.vocab_size)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation from a prompt, streamed to stdout, speed on stderr."""
    import torch

    import llamalab
    from llamalab.generate import TextStreamer, greedy_generate, render_chat_template

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = llamalab.load(args.model, dtype=_dtype(args.dtype))
    load_s = time.perf_counter() - t0
    tok = lm.tokenizer
    if args.tokenizer:
        from llamalab.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > lm.config.vocab_size:
            raise CLIError(f"--tokenizer {args.tokenizer}: {tok.vocab_size} tokens, but the model has "
                           f"vocab_size {lm.config.vocab_size}; the tokenizer does not belong to these weights")
    if tok is None:
        raise CLIError(f"{args.model}: no tokenizer found beside the weights; pass --tokenizer PATH")
    if args.chat:
        if not tok.chat_template:
            raise CLIError(f"--chat: the model {args.model} carries no chat template")
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        special = {name: tok.decode([i]) for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id))
                   if i is not None}
        text = render_chat_template(tok.chat_template, messages, add_generation_prompt=True, **special)
        ids = tok.encode(text, allow_special=True)
    else:
        ids = tok.encode(args.prompt, bos=tok.add_bos_default)
    streamer = TextStreamer(tok.decode, skip_ids=tok.stop_ids)

    def show(token_id: int) -> None:
        piece = streamer.push(token_id)
        if piece and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = greedy_generate(lm.model, ids, args.max_new_tokens, stop_ids=tok.stop_ids, on_token=show,
                             vocab_limit=tok.vocab_size)
    text = tok.decode([i for i in result.ids if i not in tok.stop_ids])
    if args.json:
        print(json.dumps({"model": args.model, "prompt_ids": ids, "ids": result.ids, "text": text,
                          "stopped_by": result.stopped_by, "load_s": load_s, "prefill_s": result.prefill_s,
                          "decode_s": result.decode_s, "prefill_tok_s": result.prefill_tok_s,
                          "decode_tok_s": result.decode_tok_s}, indent=2))
    else:
        print(flush=True)
        print(f"[load {load_s:.2f} s | prefill {len(ids)} tok at {result.prefill_tok_s:.0f} tok/s | "
              f"decode {len(result.ids)} tok at {result.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (each with an example in its help)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="llamalab", description="The LLaMA system, end to end.",
                                     epilog=MAIN_EPILOG, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt (greedy)", formatter_class=fmt,
                       description="Generate a continuation (or, with --chat, an assistant answer) greedily.",
                       epilog='example:\n  llamalab generate --chat "What is the capital of France?"\n'
                              '  llamalab generate "Once upon a time" --max-new-tokens 64 --json')
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path of a checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder, if not the checkpoint's own")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default float32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print ids, text and timings as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a checkpoint", formatter_class=fmt,
                       description="Format, config, parameter count and memory needs of a checkpoint.",
                       epilog="example:\n  llamalab info smollm2-135m-instruct\n  llamalab info ./Llama-2-7b --json")
    p.add_argument("source", help="path (Meta dir, HF dir, .gguf, native dir) or registered name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to native, HF or Meta format", formatter_class=fmt,
                       description="Read any supported format and write native, HF or Meta (sharded) format.",
                       epilog="example:\n  llamalab convert smollm2-135m-instruct out/smollm2-hf --to hf\n"
                              "  llamalab convert out/smollm2-hf out/smollm2-meta --to meta --shards 2")
    p.add_argument("source", help="path or registered name")
    p.add_argument("dest", help="output directory (must not exist)")
    p.add_argument("--to", choices=["native", "hf", "meta"], default="native", help="output format")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (default 1)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenizer", help="tokenizer tools", formatter_class=fmt,
                       epilog="example:\n  llamalab tokenizer train data/*.txt --vocab-size 32000 --out tok/llama")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a SentencePiece BPE tokenizer the LLaMA way", formatter_class=fmt,
                        description="SentencePiece BPE with the LLaMA choices: digits split, byte fallback, "
                                    "identity normalisation. Inputs: .txt or .jsonl ({\"text\": ...}).",
                        epilog="example:\n  llamalab tokenizer train corpus.jsonl --vocab-size 8000 --out tok/small")
    t.add_argument("inputs", nargs="+", help=".txt or .jsonl files")
    t.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000, as LLaMA)")
    t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, not our bug: shown as one line."""
    errors: list[type[BaseException]] = [CLIError, OSError, ValueError, KeyError]
    try:
        from llamalab.checkpoint import CheckpointError

        errors.append(CheckpointError)
    except ImportError:
        pass
    try:
        from llamalab.tokenizer import TokenizerError

        errors.append(TokenizerError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llamalab` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except KeyboardInterrupt:
        print("llamalab: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"llamalab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
