"""Serving throughput under concurrent clients: `llamalab serve` (continuous batching) on loopback,
driven by OpenAI's own Python client, N clients each sending one streaming chat request at once.

For each N in ``--clients`` (default 1, 2, 4, 8, 16), a round starts N threads at the same instant;
each sends a chat completion (``stream=True``, ``max_tokens`` 128, greedy, a different question
per client) and records the time to its first content chunk (TTFT), the gaps between chunks
(inter-token latency) and the tokens it got (``stream_options.include_usage``; for a server that
sends no usage while streaming, llama-cpp-python's, its content chunks, one per token). A round's
aggregate throughput is all the clients' completion tokens over the round's wall time; for llamalab
also the server's mean step time and batch size over the round (from its ``/metrics``). Rounds
repeat (``--rounds``), cycling through the client counts (1 2 4 8 16 1 2 ...), because the
machine's speed drifts; the table gives medians, and the ratios to the 1-client figure of the
same run.

The server is the real command (``llamalab serve --parallel P``, a subprocess, 2 threads),
serving the GGUF as stored (its quantized blocks). With ``--llama-cpp`` and llama-cpp-python's
server extra installed (``pip install --no-deps pydantic-settings python-dotenv sse-starlette starlette-context``
beside llama-cpp-python), its server runs the same file beside it, measured in the same cycle.
That server answers one request at a time (llama-cpp-python 0.3.36 has no parallel slots).
llama.cpp's own C++ ``llama-server`` has them: ``--llama-server PATH`` runs that binary beside
llamalab on the same file, 2 threads, ``--parallel`` slots of 1,024 positions each (its continuous
batching, its default f16 KV cache), measured in the same cycle. It is not in the Python package:
build it from the llama.cpp sources that llama-cpp-python's sdist vendors (commands in
docs/serve.md).

Usage: ``python benchmarks/serve.py [--rounds 3] [--clients 1,2,4,8,16] [--parallel 16]
[--kv-cache auto] [--max-prefill-tokens 4096] [--llama-cpp] [--llama-server PATH] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

THREADS = 2
QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a steam engine works, step by step.",
    "Describe a walk through a forest in autumn.",
    "What are the main causes of the seasons on Earth? Explain in detail.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the water cycle to a ten-year-old.",
    "Describe how bread is made, from the field to the table.",
    "Tell the story of a small town's first library.",
]

# llama-cpp-python's server with its AMX weight repacking off where the CPU has AMX, as
# llamalab.quant.llama_cpp opens llama.cpp (the repacked kernels crash on batches here).
LLAMA_CPP_SERVER = r"""
import sys, importlib.util, pathlib
import llama_cpp.llama_cpp as low
if "amx_int8" in pathlib.Path("/proc/cpuinfo").read_text():
    defaults = low.llama_model_default_params
    def no_extra_buffers():
        p = defaults(); p.use_extra_bufts = False; return p
    low.llama_model_default_params = no_extra_buffers
import runpy
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {base} did not come up in {timeout:.0f} s")


def start_llamalab(model: str, parallel: int, kv_cache: str = "auto",
                   max_prefill_tokens: int = 4096) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen([sys.executable, "-m", "llamalab.cli", "serve", "--model", model, "--port", str(port),
                             "--threads", str(THREADS), "--parallel", str(parallel), "--ctx-size", "1024",
                             "--kv-cache", kv_cache, "--max-prefill-tokens", str(max_prefill_tokens),
                             "--log-level", "warning"], env=env, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", Path(model).name if Path(model).exists() else model


def start_llama_cpp(path: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LLAMA_CPP_SERVER, "--model", path, "--port", str(port),
                             "--n_threads", str(THREADS), "--n_ctx", "4096", "--model_alias", "llama.cpp",
                             # queue concurrent requests (by default a new one interrupts the running one)
                             "--interrupt_requests", "False"],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", "llama.cpp"


def start_llama_server(binary: str, path: str, parallel: int) -> tuple[subprocess.Popen, str, str]:
    """llama.cpp's C++ server: ``parallel`` slots of 1,024 positions (``-c`` is their total)."""
    if not Path(binary).is_file():
        raise SystemExit(f"--llama-server {binary}: no such file (build llama.cpp's llama-server, see docs/serve.md)")
    port = free_port()
    cmd = [binary, "--model", path, "--port", str(port), "--host", "127.0.0.1", "--threads", str(THREADS),
           "--threads-batch", str(THREADS), "--parallel", str(parallel), "--ctx-size", str(1024 * parallel),
           "--alias", "llama-server", "--no-webui"]
    if "amx_int8" in Path("/proc/cpuinfo").read_text():
        cmd.append("--no-repack")  # as for llama-cpp-python above: its AMX repacked kernels crash on batches here
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", "llama-server"


def one_request(client: Any, model: str, question: str, max_tokens: int, start: threading.Barrier,
                out: dict[str, Any]) -> None:
    start.wait()
    t0 = time.perf_counter()
    first, last, gaps, tokens, chunks = None, None, [], 0, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = now
            elif last is not None:
                gaps.append(now - last)
            last = now
    # Servers that do not send usage while streaming (llama-cpp-python's): one token per content chunk,
    # as they stream them.
    out.update(ttft=(first or time.perf_counter()) - t0, end=time.perf_counter(), start=t0, tokens=tokens or chunks,
               gaps=gaps, counted="usage" if tokens else "chunks")


def server_steps(base: str) -> tuple[float, float, float] | None:
    """llamalab's (steps, seconds in steps, sequences stepped) from its /metrics; None elsewhere."""
    import httpx

    r = httpx.get(f"{base}/metrics", timeout=10)
    if r.status_code != 200:
        return None
    values = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = float(value) if value and not line.startswith("#") else 0.0
    return (values.get("llamalab_step_seconds_count", 0.0), values.get("llamalab_step_seconds_sum", 0.0),
            values.get("llamalab_batch_size_sum", 0.0))


def run_round(base: str, model: str, n: int, max_tokens: int, tag: str) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    barrier = threading.Barrier(n)
    outs: list[dict[str, Any]] = [{} for _ in range(n)]
    before = server_steps(base)
    # A different question for every request of the run ("Request <tag>.<i>: ..."): the prompts share
    # the chat template's system prompt, as real users' do, not whole earlier prompts.
    threads = [threading.Thread(target=one_request, args=(client, model, f"Request {tag}.{i}: "
                                                         f"{QUESTIONS[i % len(QUESTIONS)]}", max_tokens,
                                                         barrier, outs[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any("tokens" not in o for o in outs):
        raise SystemExit("a request failed")
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    gaps = [g for o in outs for g in o["gaps"]]
    out = {"tok_s": sum(o["tokens"] for o in outs) / wall, "ttft_p50": statistics.median(o["ttft"] for o in outs),
           "ttft_max": max(o["ttft"] for o in outs), "itl_p50": statistics.median(gaps) if gaps else float("nan"),
           "tokens": sum(o["tokens"] for o in outs), "wall": wall, "step_ms": float("nan"), "batch": float("nan")}
    after = server_steps(base) if before is not None else None
    if after is not None and after[0] > before[0]:  # the server's own view: mean step time, mean batch
        out["step_ms"] = 1e3 * (after[1] - before[1]) / (after[0] - before[0])
        out["batch"] = (after[2] - before[2]) / (after[0] - before[0])
    return out


def main() -> None:
    """Start the servers, measure the client counts in cycles, print the table, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="GGUF file or registered name")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=16, help="llamalab serve --parallel (rows decoded together)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python's server on the same file")
    ap.add_argument("--kv-cache", default="auto",
                    help="llamalab serve --kv-cache; a comma list (e.g. float32,float16) runs one server per value, "
                         "measured in alternation")
    ap.add_argument("--max-prefill-tokens", default="4096",
                    help="llamalab serve --max-prefill-tokens; a comma list (e.g. 4096,40) runs one server per value "
                         "(and per --kv-cache value), measured in alternation")
    ap.add_argument("--llama-server", default=None, metavar="PATH",
                    help="also llama.cpp's C++ llama-server binary at PATH, with --parallel slots, on the same file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, "src")
    from llamalab.checkpoint.registry import resolve
    from llamalab.precision import cpu_flags, cpu_name

    path = str(resolve(args.model))
    counts = [int(c) for c in args.clients.split(",")]
    kinds = args.kv_cache.split(",")
    budgets = [int(b) for b in args.max_prefill_tokens.split(",")]

    def label(kv: str, budget: int) -> str:
        parts = ([f"kv={kv}"] if len(kinds) > 1 else []) + ([f"pf={budget}"] if len(budgets) > 1 else [])
        return ",".join(parts) or "llamalab"

    servers = [(label(kv, b), *start_llamalab(args.model, args.parallel, kv, b)) for kv in kinds for b in budgets]
    if args.llama_cpp:
        servers.append(("llama.cpp", *start_llama_cpp(path)))
    if args.llama_server:
        servers.append(("llama-server", *start_llama_server(args.llama_server, path, args.parallel)))
    results: dict[str, dict[int, list[dict[str, float]]]] = {s[0]: {n: [] for n in counts} for s in servers}
    try:
        for name, proc, base, model in servers:
            wait_ready(base, proc)
            run_round(base, model, 1, 8, "warm-up")
        for r in range(args.rounds):
            for n in counts:
                for name, _, base, model in servers:
                    m = run_round(base, model, n, args.max_tokens, f"{r}.{n}")
                    results[name][n].append(m)
                    print(f"round {r + 1}/{args.rounds} {name:<18} {n:>2} clients: {m['tok_s']:7.1f} tok/s, "
                          f"TTFT p50 {m['ttft_p50'] * 1e3:7.0f} ms, ITL p50 {m['itl_p50'] * 1e3:6.1f} ms, "
                          f"{m['tokens']} tokens", flush=True)
    finally:
        for _, proc, _, _ in servers:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in cpu_flags())
    print(f"\nCPU: {cpu_name()} ({isa}); {Path(path).name} as stored, {THREADS} threads; streaming chat, "
          f"max_tokens {args.max_tokens}, greedy; llamalab --parallel {args.parallel}; medians of {args.rounds} rounds")
    print(f"{'server':<18}{'clients':>8}{'tok/s':>9}{'x 1 client':>11}{'TTFT p50 ms':>13}{'x 1 client':>11}"
          f"{'TTFT max ms':>13}{'ITL p50 ms':>12}{'step ms':>9}{'batch':>7}")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, per in results.items():
        med = {n: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for n, ms in per.items()}
        base1 = med.get(1)
        for n, m in med.items():
            tput = m["tok_s"] / base1["tok_s"] if base1 else float("nan")
            ttft = m["ttft_p50"] / base1["ttft_p50"] if base1 else float("nan")
            print(f"{name:<18}{n:>8}{m['tok_s']:>9.1f}{tput:>11.2f}{m['ttft_p50'] * 1e3:>13.0f}{ttft:>11.2f}"
                  f"{m['ttft_max'] * 1e3:>13.0f}{m['itl_p50'] * 1e3:>12.1f}{m['step_ms']:>9.1f}{m['batch']:>7.1f}")
        table[name] = {str(n): m for n, m in med.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "model": Path(path).name, "parallel": args.parallel,
                                               "max_tokens": args.max_tokens, "rounds": args.rounds,
                                               "medians": table}, indent=2))


if __name__ == "__main__":
    main()
