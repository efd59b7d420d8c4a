"""``llamalab serve``: the argument parser and the command (uvicorn over ``create_app``).

Wire it into llamalab's CLI with ``add_serve_parser(sub)`` beside the other sub-commands; the
parser sets ``func=cmd_serve``. Errors the user can fix (an unknown model, a port in use) are
raised as ``ValueError`` / ``OSError`` so the CLI prints them as one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from llamalab.precision import KV_CACHE_CHOICES

__all__ = ["add_serve_parser", "cmd_serve"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")

SERVE_EPILOG = """\
example:
  llamalab serve --model smollm2-135m-instruct --port 8000 --parallel 8

then:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG,
        description="Serve a checkpoint over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions "
                    "(streaming too), /v1/models, /health. Requests are decoded together: each joins the running "
                    "batch at the next token and leaves it when done (continuous batching, --parallel at a time).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"name or path of a checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--name", default=None,
                   help="model id the API reports and requests must name (default: --model, or a path's folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype (default auto: a quantized GGUF runs in its blocks; else bfloat16 where the "
                        "CPU computes it natively, else float32)")
    p.add_argument("--kv-cache", default="auto", choices=KV_CACHE_CHOICES,
                   help="the KV cache's dtype (default auto: float16 for a quantized GGUF, as llama.cpp keeps it; "
                        "else the weights' dtype); 16 bits hold twice the positions in the same memory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step: ~1.6-2x decode speed at float32 (~1.15-1.2x "
                        "at bfloat16) on CPU; compiles for ~20-80 s before serving")
    p.add_argument("--parallel", type=int, default=4,
                   help="requests decoded together (KV cache rows; default 4); more wait in arrival order")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens prefilled in one step at most, those of a cached prefix not counted "
                        "(default 4096; a longer prompt gets in alone). Lower staggers a burst of newcomers: "
                        "the first get their first token sooner, the last later")
    p.add_argument("--ctx-size", type=int, default=None,
                   help="positions per request, prompt and answer (default: the model's context, at most 4096); "
                        "the KV cache holds --parallel x --ctx-size positions")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                        "LLAMALAB_API_KEY environment variable; unset: no key)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C: stop accepting, let requests in flight finish for up to this many "
                        "seconds, cancel the rest, exit 0 (default 30)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="chat answer limit when a request sets none (default 512)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)
    return p


def model_id(model: str) -> str:
    """The id a model is served under: a registered name as is, a path by its file or folder name."""
    path = Path(model)
    return path.name if path.exists() else model


def _check_port_free(host: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


T = TypeVar("T")


def _on_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` run on a new thread (waited for); its result, or its exception raised here."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread, which reports it
            box["error"] = e

    thread = threading.Thread(target=run, name="llamalab-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve it with uvicorn until interrupted."""
    import time

    import torch
    import uvicorn

    import llamalab
    from llamalab.serve.app import create_app

    if args.default_max_tokens < 1:
        raise ValueError(f"--default-max-tokens {args.default_max_tokens}: expected at least 1")
    if args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel}: expected at least 1")
    if args.max_prefill_tokens < 1:
        raise ValueError(f"--max-prefill-tokens {args.max_prefill_tokens}: expected at least 1")
    if args.grace < 0:
        raise ValueError(f"--grace {args.grace}: expected seconds >= 0")
    _check_port_free(args.host, args.port)
    # The model runs on the worker's thread, with `threads` threads; this (uvicorn's) thread never
    # runs parallel work. GNU OpenMP keeps a pool of threads per thread that starts parallel work,
    # and once it manages more threads than there are cores it stops spinning between parallel
    # regions and sleeps instead: a model loaded here with 2 threads, then stepped on the worker
    # with 2 more, ran its decode steps 2.6x slower on a 2-core machine (measured: 20 vs 7.7 ms a
    # step). So this thread takes 1, and the loading runs on a thread of its own, whose pool ends
    # with it.
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)
    name = args.name or model_id(args.model)
    t0 = time.perf_counter()
    from llamalab.precision import hardware_line, parse_kv_cache, parse_load_dtype

    print(hardware_line(), file=sys.stderr)

    def load() -> tuple[Any, Any]:
        torch.set_num_threads(threads)
        lm = llamalab.load(args.model, dtype=parse_load_dtype(args.dtype))
        kv = parse_kv_cache(args.kv_cache)
        if kv is not None:
            lm.model.kv_cache_dtype = kv
        generator = None
        if args.compile and lm.tokenizer is not None:  # (without one, create_app says so)
            from llamalab.generate import Generator

            generator = Generator(lm.model, lm.tokenizer, vocab_limit=lm.tokenizer.vocab_size, compile=True)
            print("llamalab serve: compiling the decode step (--compile) before serving ...", file=sys.stderr,
                  flush=True)
            print(f"llamalab serve: compiled in {generator.warm_up():.1f} s", file=sys.stderr, flush=True)
        return lm, generator

    lm, generator = _on_own_thread(load)
    context = lm.config.max_seq_len
    if args.ctx_size is not None and not 1 <= args.ctx_size <= context:
        raise ValueError(f"--ctx-size {args.ctx_size}: expected 1..{context} (the model's context)")
    api_key = args.api_key or os.environ.get("LLAMALAB_API_KEY") or None
    app = create_app(lm, name, generator=generator, default_max_tokens=args.default_max_tokens,
                     parallel=args.parallel, ctx_size=args.ctx_size, api_key=api_key, threads=threads,
                     max_prefill_tokens=args.max_prefill_tokens)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    kv = str(lm.model.kv_cache_dtype or lm.model.tok_embeddings.weight.dtype).removeprefix("torch.")
    print(f"llamalab serve: loaded {name} in {time.perf_counter() - t0:.1f} s (KV cache {kv}); "
          f"serving http://{shown}:{args.port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
    # SIGTERM / SIGINT: uvicorn stops accepting, waits for open requests up to --grace, then the
    # app's shutdown cancels what is left in the batch. uvicorn then raises the signal again under
    # the handler it found: a no-op one for SIGTERM, so that a drained server exits 0 (a service
    # manager's "stopped cleanly") rather than "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.grace)
    print("llamalab serve: stopped", file=sys.stderr, flush=True)
    return 0
