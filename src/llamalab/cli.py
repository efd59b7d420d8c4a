"""`llamalab <command>`: thin argument parsing over the library; errors are one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from llamalab.precision import KV_CACHE_CHOICES

DEFAULT_MODEL = "smollm2-135m-instruct"

MAIN_EPILOG = """\
examples:
  llamalab generate --chat "Name three primary colours."
  llamalab chat --system "You are a concise assistant."
  llamalab serve --port 8000
  llamalab info smollm2-135m-instruct
  llamalab convert smollm2-135m-instruct out/smollm2-hf --to hf
  llamalab tokenizer train corpus.jsonl --vocab-size 32000 --out tok/llama
  llamalab tokenize data/*.txt --tokenizer tok/llama.model --out data/tokens
  llamalab data run configs/data/demo.toml
  llamalab pretrain --config configs/pretrain/cpu-shakespeare.toml
  llamalab plot runs/tiny
  llamalab finetune --config configs/finetune/cpu-sft-lora.toml
  llamalab rejection-sample --config configs/finetune/cpu-rejection-sampling.toml
  llamalab gatt eval --model smollm2-135m-instruct --dialogues data/gatt/eval.jsonl
  llamalab eval --tasks hellaswag,piqa,mmlu --limit 100 --out runs/eval.json
  llamalab quantize smollm2-135m-instruct out/smol-q4_0.gguf --type q4_0 --gptq --calib data/calib.txt
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _dtype(name: str):  # noqa: ANN202 - torch imported lazily to keep --help fast
    """A ``--dtype`` value for loading (:func:`llamalab.precision.parse_load_dtype`: auto is None,
    "as stored", so a quantized GGUF runs quantized)."""
    from llamalab.precision import parse_load_dtype

    return parse_load_dtype(name)


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's format, config, parameter count and memory needs; without one, the machine's
    CPU, what precision ``auto`` picks and which decode kernel path runs."""
    if args.source is None:
        from llamalab.precision import describe_hardware

        info = describe_hardware()
    else:
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
    if args.type is not None and args.to != "gguf":
        raise CLIError(f"--type {args.type}: only for --to gguf (the other formats keep the tensors' dtype)")
    dst = write_checkpoint(ckpt, args.dest, to=args.to, n_shards=args.shards, tensor_type=args.type)
    print(f"wrote {args.to} checkpoint to {dst} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    """Average checkpoints of one model (Polyak averaging, as Llama 3 makes its final model)."""
    from llamalab.checkpoint import write_checkpoint
    from llamalab.checkpoint.average import average_checkpoints

    t0 = time.perf_counter()
    weights = None
    if args.weights is not None:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise CLIError(f"--weights {args.weights!r}: expected comma-separated numbers, one per checkpoint") from None
    ckpt = average_checkpoints(args.checkpoints, weights=weights)
    if args.tokenizer:
        from llamalab.tokenizer import load_tokenizer

        ckpt.tokenizer = load_tokenizer(args.tokenizer)
    if args.type is not None and args.to != "gguf":
        raise CLIError(f"--type {args.type}: only for --to gguf")
    dst = write_checkpoint(ckpt, args.out, to=args.to, tensor_type=args.type)
    print(f"wrote the mean of {len(args.checkpoints)} checkpoints as {args.to} to {dst} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a SentencePiece BPE tokenizer the LLaMA way."""
    from llamalab.tokenizer import train_sentencepiece

    out = train_sentencepiece(args.inputs, args.out, vocab_size=args.vocab_size)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _set_kv_cache(model: Any, name: str, verbose: bool = False) -> None:
    """Apply ``--kv-cache`` to a loaded model (``auto``: leave its default); ``verbose``: say which."""
    from llamalab.precision import parse_kv_cache

    dtype = parse_kv_cache(name)
    if dtype is not None:
        model.kv_cache_dtype = dtype
    if verbose:
        shown = model.kv_cache_dtype or model.tok_embeddings.weight.dtype
        print(f"llamalab: KV cache {str(shown).removeprefix('torch.')}", file=sys.stderr)


def _load_for_generation(args: argparse.Namespace):  # noqa: ANN202 - torch imported lazily
    """Load ``--model`` (and ``--tokenizer``) for generate/chat; returns (loaded model, tokenizer, seconds)."""
    import torch

    import llamalab

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.verbose:
        from llamalab.precision import hardware_line

        print(hardware_line(), file=sys.stderr)
    t0 = time.perf_counter()
    lm = llamalab.load(args.model, dtype=_dtype(args.dtype))
    _set_kv_cache(lm.model, args.kv_cache, verbose=args.verbose)
    tok = lm.tokenizer
    if args.tokenizer:
        from llamalab.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > lm.config.vocab_size:
            raise CLIError(f"--tokenizer {args.tokenizer}: {tok.vocab_size} tokens, but the model has "
                           f"vocab_size {lm.config.vocab_size}; the tokenizer does not belong to these weights")
    if tok is None:
        raise CLIError(f"{args.model}: no tokenizer found beside the weights; pass --tokenizer PATH")
    return lm, tok, time.perf_counter() - t0


def _generation_config(args: argparse.Namespace, stop_ids: object = None):  # noqa: ANN202
    """The GenerationConfig the sampling flags describe (validated: a bad value is a one-line error)."""
    from llamalab.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              num_beams=getattr(args, "beams", 1), length_penalty=getattr(args, "length_penalty", 1.0),
                              seed=args.seed, stop_ids=tuple(stop_ids) if stop_ids else None,
                              stop_strings=tuple(args.stop or ()))
    config.validate()
    return config


def _speed_line(load_s: float, result) -> str:  # noqa: ANN001
    n = len(result.prompt_ids)
    return (f"[load {load_s:.2f} s | prefill {n} tok at {result.prefill_tok_s:.0f} tok/s | "
            f"decode {len(result.ids)} tok at {result.decode_tok_s:.1f} tok/s]")


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from one prompt: text on stdout (streamed to a terminal), speed on stderr."""
    from llamalab.generate import Generator, chat_stop_ids, encode_chat

    lm, tok, load_s = _load_for_generation(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = encode_chat(tok, messages, fmt=args.chat_format)
        config = _generation_config(args, chat_stop_ids(tok, args.chat_format))
    else:
        ids = tok.encode(args.prompt, bos=tok.add_bos_default)
        config = _generation_config(args)
    stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
    if stream and config.num_beams > 1:
        raise CLIError("--stream: beam search chooses its answer only at the end; drop --stream or --beams")
    gen = Generator(lm.model, tok, compile=args.compile)
    if stream and not args.json:
        for piece in gen.stream(ids, config):
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = gen.last_result
        print(flush=True)
    else:
        result = gen.generate([ids], config)[0]
        if not args.json:
            print(result.text, flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "prompt_ids": ids, "ids": result.ids, "text": result.text,
                          "finish_reason": result.finish_reason, "logprobs": result.logprobs, "load_s": load_s,
                          "prefill_s": result.prefill_s, "decode_s": result.decode_s,
                          "prefill_tok_s": result.prefill_tok_s, "decode_tok_s": result.decode_tok_s}, indent=2))
    else:
        print(_speed_line(load_s, result), file=sys.stderr)
    return 0


CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (new system prompt, resets),
          /exit or Ctrl-D (leave), Ctrl-C (stop the current answer)"""


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat with history; Ctrl-C stops an answer, Ctrl-D leaves."""
    from llamalab.generate import Generator, chat_stop_ids, encode_chat

    lm, tok, load_s = _load_for_generation(args)
    config = _generation_config(args, chat_stop_ids(tok, args.chat_format))
    gen = Generator(lm.model, tok, compile=args.compile)
    if args.compile:  # compile now, so that the first answer does not stall for it
        print("llamalab chat: compiling the decode step (--compile) ...", file=sys.stderr, flush=True)
        print(f"llamalab chat: compiled in {gen.warm_up():.1f} s", file=sys.stderr, flush=True)
    system = args.system
    messages: list[dict[str, str]] = []
    print(f"llamalab chat: {args.model} loaded in {load_s:.1f} s. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, stay in the session
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line.strip().partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                messages = []
                print("[conversation reset]", file=sys.stderr)
            elif command == "/system":
                system, messages = rest.strip() or None, []
                print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", file=sys.stderr)
            else:
                print(f"[unknown command {command}] {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = _fit_history(tok, system, messages, config.max_new_tokens, lm.config.max_seq_len, args.chat_format)
        if ids is None:
            messages.pop()
            print(f"[message too long for the {lm.config.max_seq_len}-token context]", file=sys.stderr)
            continue
        pieces: list[str] = []
        stream = gen.stream(ids, config)
        try:
            for piece in stream:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print(flush=True)
            print(_speed_line(0.0, gen.last_result).replace("load 0.00 s | ", ""), file=sys.stderr)
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)
        finally:
            stream.close()
        messages.append({"role": "assistant", "content": "".join(pieces)})


def _fit_history(tok, system: str | None, messages: list[dict[str, str]], max_new: int, context: int,  # noqa: ANN001
                 fmt: str | None) -> list[int] | None:
    """Prompt ids for the conversation, dropping the oldest exchanges until the answer fits the context."""
    from llamalab.generate import encode_chat

    while messages:
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        ids = encode_chat(tok, convo, fmt=fmt)
        if len(ids) + max_new <= context:
            return ids
        if len(messages) <= 1:
            return None
        del messages[:2]  # the oldest user/assistant exchange
    return None


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path of a checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder, if not the checkpoint's own")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (chat)")
    p.add_argument("--chat-format", choices=["template", "llama3", "llama2"], default=None,
                   help="chat format (default: the checkpoint's template, else Llama 3's or Llama 2's)")
    p.add_argument("--dtype", default="auto",
                   help="auto, float32 or bfloat16 (default auto: a quantized GGUF (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K) runs in its "
                        "blocks on llamalab's quantized kernels; other checkpoints in bfloat16 where the CPU "
                        "computes it natively (AVX512-BF16, AMX) or on a GPU, else float32; a float dtype "
                        "dequantizes a GGUF at load). bfloat16 weights decode ~1.5x faster "
                        "than float32 on any x86-64 CPU (half the bytes; widened to fp32 in registers without "
                        "AVX512-BF16)")
    p.add_argument("--kv-cache", default="auto", choices=KV_CACHE_CHOICES,
                   help="the KV cache's dtype (default auto: float16 for a quantized GGUF, as llama.cpp keeps it; "
                        "else the weights' dtype); a 16-bit cache holds twice the positions in the same memory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true",
                   help="also print the CPU, the precision auto picks and the decode kernel in use")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step: ~1.15x decode speed at float32 (~1.2x "
                        "at bfloat16) on CPU, after ~20-80 s of compiling (chat: before the first prompt; "
                        "worth it for long sessions)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (each with an example in its help)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="llamalab", description="The LLaMA system, end to end.",
                                     epilog=MAIN_EPILOG, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt", formatter_class=fmt,
                       description="Generate a continuation (or, with --chat, an assistant answer): greedy by "
                                   "default, sampling with --temperature/--top-k/--top-p, beam search with --beams.",
                       epilog='examples:\n  llamalab generate --chat "What is the capital of France?"\n'
                              '  llamalab generate "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1\n'
                              '  llamalab generate "The LLaMA paper" --beams 4 --max-new-tokens 32 --json')
    p.add_argument("prompt", help="the prompt text")
    _add_sampling_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    p.add_argument("--beams", type=int, default=1, help="beam search with this many beams (default 1: off)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length^this")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (default: when stdout is a terminal)")
    p.add_argument("--json", action="store_true", help="print ids, text, logprobs and timings as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat interactively with a model", formatter_class=fmt,
                       description="An interactive chat with history. " + CHAT_HELP,
                       epilog='example:\n  llamalab chat --system "You are a concise assistant."\n'
                              '  llamalab chat --model out/my-sft --temperature 0.7 --top-p 0.9')
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    from llamalab.serve import add_serve_parser  # FastAPI itself is imported only when serving

    add_serve_parser(sub)

    from llamalab.data.cli import add_tokenize_parser
    from llamalab.train.cli import add_plot_parser, add_pretrain_parser

    add_tokenize_parser(sub)

    from llamalab.data.pipeline.cli import add_data_parser

    add_data_parser(sub)
    add_pretrain_parser(sub)

    from llamalab.finetune.cli import (add_finetune_data_parser, add_finetune_parser, add_gatt_parser,
                                       add_merge_lora_parser, add_rejection_parser, add_reward_parser)

    add_finetune_parser(sub)
    add_finetune_data_parser(sub)
    add_merge_lora_parser(sub)
    add_reward_parser(sub)
    add_rejection_parser(sub)
    add_gatt_parser(sub)
    add_plot_parser(sub)

    from llamalab.eval.cli import add_eval_parser

    add_eval_parser(sub)

    from llamalab.quant.cli import add_quantize_parser

    add_quantize_parser(sub)

    from llamalab.scaling.cli import add_scaling_parser

    add_scaling_parser(sub)

    p = sub.add_parser("info", help="describe a checkpoint, or this machine", formatter_class=fmt,
                       description="Format, config, parameter count and memory needs of a checkpoint; without "
                                   "one, this machine: CPU and vector extensions, the precision `auto` picks, "
                                   "the decode kernel's path.",
                       epilog="example:\n  llamalab info smollm2-135m-instruct\n  llamalab info ./Llama-2-7b --json\n"
                              "  llamalab info")
    p.add_argument("source", nargs="?", default=None,
                   help="path (Meta dir, HF dir, .gguf, native dir) or registered name (none: this machine)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to native, HF, Meta or GGUF format", formatter_class=fmt,
                       description="Read any supported format and write native, HF, Meta (sharded) or GGUF "
                                   "(llama.cpp's single file, matrices in --type).",
                       epilog="example:\n  llamalab convert smollm2-135m-instruct out/smollm2-hf --to hf\n"
                              "  llamalab convert out/smollm2-hf out/smollm2-meta --to meta --shards 2\n"
                              "  llamalab convert smollm2-135m-instruct out/smollm2-q8_0.gguf --to gguf --type q8_0")
    p.add_argument("source", help="path or registered name")
    p.add_argument("dest", help="output directory (must not exist); for --to gguf the output file")
    p.add_argument("--to", choices=["native", "hf", "meta", "gguf"], default="native", help="output format")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (default 1)")
    p.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q3_k"],
                   help="--to gguf: the matrices' type (default f16; q8_0/q4_0/q4_1/q4_k/q3_k: round-to-nearest "
                        "blocks, the embedding too; `llamalab quantize` for GPTQ and a q8_0 embedding)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("average", help="average checkpoints of one model (Polyak averaging)", formatter_class=fmt,
                       description="The tensor-by-tensor mean of checkpoints of one model (same config and "
                                   "tensors; any format llamalab reads), written in any format `convert` writes. "
                                   "Llama 3 makes its final model this way from the anneal's checkpoints "
                                   "(a run with checkpoint.average_anneal = true does it itself).",
                       epilog="examples:\n  llamalab average runs/x/checkpoints/step-0009{97,98,99} runs/x/checkpoints/step-001000 "
                              "--out runs/x/averaged --tokenizer tok/llama.model\n"
                              "  llamalab average a/ b/ --weights 0.7,0.3 --out mix.gguf --to gguf --type q8_0")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="two or more checkpoints (paths or registered names)")
    p.add_argument("--out", required=True, help="output directory (must not exist); for --to gguf the output file")
    p.add_argument("--to", choices=["native", "hf", "meta", "gguf"], default="native", help="output format")
    p.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q3_k"],
                   help="--to gguf: the matrices' type")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="one weight per checkpoint (normalised; default: the uniform mean)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="the tokenizer to ship with the result (default: the first checkpoint's, if it has one; "
                        "training step checkpoints have none)")
    p.set_defaults(func=cmd_average)

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
    import jinja2  # a chat template that rejects the conversation

    errors: list[type[BaseException]] = [CLIError, OSError, ValueError, KeyError, jinja2.TemplateError]
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
