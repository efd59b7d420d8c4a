"""Matrix-vector products for decoding on x86-64 CPUs, fp32 and bf16 (``csrc/gemv.cpp``).

A decode step multiplies each weight matrix by one vector (one row per sequence of the
batch), so it runs at the speed the weights stream from memory. This kernel reads the weights
as they are (row-major, no copy), 8 rows at a time, one vector load per row and step. On the
2-core AVX-512 reference CPU it reads SmolLM2-135M's matrices at 41-46 GB/s where oneDNN
reaches 22-38 GB/s (bf16) and ~30 GB/s (fp32): the model's 121 products per token 7.7 ->
6.1 ms in bf16, 17.7 -> 11.8 ms in fp32 (measured in one run).

One path per instruction set, chosen at run time by what the CPU reports (:func:`isa`):

- ``avx512bf16``: bf16 weights by VDPBF16PS, fp32 by 16-lane FMAs;
- ``avx512``: fp32 as above, bf16 weights widened to fp32 in registers;
- ``avx2`` (AVX2 + FMA): 8-lane FMAs, bf16 weights widened to fp32 in registers (a shift and
  a mask per 32 bytes: a bf16 value is the top half of an fp32), as llama.cpp widens F16
  with F16C.

``LLAMALAB_GEMV_ISA=avx2|avx512|avx512bf16`` (or :func:`use_isa`) forces a path the CPU has,
so that tests exercise every path the machine supports; a path it lacks is an error.

Built on first use with torch's C++ extension loader (``torch.utils.cpp_extension``, ~10-30 s,
cached under ``TORCH_EXTENSIONS_DIR``), registered as ``torch.ops.llamalab.gemv`` with a
shape rule so that ``torch.compile`` can call it. Where it cannot be had (not x86-64, a CPU
with neither AVX2+FMA nor AVX-512, no C++ compiler or ninja, or ``LLAMALAB_GEMV=0`` in the
environment) :func:`gemv_available` is False and callers keep oneDNN's (or torch's) kernels;
:func:`unavailable_reason` says why.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["gemv_available", "unavailable_reason", "gemv", "decode_attention", "decode_attention_rows", "isa", "available_isas", "use_isa", "MAX_ROWS"]

log = logging.getLogger(__name__)

# Rows of x (sequences of a batched step) the kernel takes: the first row reads the weights from
# memory, the others find each group of rows in L1/L2. Larger products (prefill) are GEMMs.
MAX_ROWS = 4

_SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
# The decode step's attention (rotary embedding, cache write, one-query attention) in one call.
_ATTENTION_SOURCE = _SOURCE.with_name("attention.cpp")
_HEADER = _SOURCE.with_name("x86_simd.h")  # included by both
_NAME = "llamalab_gemv"
_lock = threading.Lock()
_built: str | None = None  # '' once loaded, else why not


def _build() -> str:
    """Build and load the extension; '' on success, else why not."""
    from llamalab.cext import build_extension

    reason = build_extension(_NAME, [_SOURCE, _ATTENTION_SOURCE], [_HEADER], disable_env="LLAMALAB_GEMV",
                             what="decode kernel")
    if reason:
        return reason
    for op, rule in (("llamalab::gemv", _gemv_shape), ("llamalab::decode_attention", _attention_shape)):
        try:
            torch.library.register_fake(op)(rule)
        except RuntimeError:  # registered already (the library was loaded before in this process)
            pass
    forced = os.environ.get("LLAMALAB_GEMV_ISA", "auto").strip().lower() or "auto"
    try:
        torch.ops.llamalab.gemv_set_isa(forced)
    except RuntimeError as e:  # a path the CPU lacks, or a misspelt name
        return f"LLAMALAB_GEMV_ISA={forced}: {str(e).splitlines()[0]}"
    if torch.ops.llamalab.gemv_isa() == "none":
        return "this CPU has neither AVX2+FMA nor AVX-512"
    return ""


def _gemv_shape(x: Tensor, weight: Tensor, other: Tensor | None = None, float_out: bool = False,
                norm: Tensor | None = None, eps: float = 1e-5, swiglu: bool = False) -> Tensor:
    """The output's shape and dtype, for tracing: x's leading dimensions, then the weight's rows."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if float_out else x.dtype)


def _attention_shape(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                     n_heads: int, n_kv_heads: int) -> Tensor:
    """The output's shape and dtype, for tracing: qkv's leading dimensions, then the query heads."""
    return qkv.new_empty((*qkv.shape[:-1], n_heads * k_cache.shape[-1]))


def unavailable_reason(dtype: torch.dtype = torch.bfloat16) -> str:
    """Why the kernel cannot run ``dtype`` weights here ('' when it can); builds it on first call."""
    global _built
    if _built is None:
        with _lock:
            if _built is None:
                _built = _build()
                if _built:
                    log.info("matrix-vector kernel unavailable (%s); using oneDNN", _built)
    if _built:
        return _built
    if dtype not in (torch.bfloat16, torch.float32):
        return f"the kernel is for bf16 and fp32 weights, not {dtype}"
    return ""


def gemv_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the kernel is built, loaded, and this CPU runs it on ``dtype`` weights."""
    return not unavailable_reason(dtype)


def isa() -> str:
    """The kernel's path in use ("avx2", "avx512", "avx512bf16"), or "none: <why>" where it cannot run."""
    reason = unavailable_reason(torch.float32)
    return f"none: {reason}" if reason else torch.ops.llamalab.gemv_isa()


def available_isas() -> list[str]:
    """The paths this CPU can run, best last ([] where the kernel cannot be built)."""
    if unavailable_reason(torch.float32):
        return []
    return list(torch.ops.llamalab.gemv_isas())


@contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernel on path ``name`` (one of :func:`available_isas`, or "auto") inside the block.

    Process-wide (the path is one setting of the loaded library): for tests and benchmarks.
    """
    if _built != "":
        reason = unavailable_reason(torch.float32)
        if reason:
            raise RuntimeError(f"llamalab gemv: {reason}")
    previous = torch.ops.llamalab.gemv_set_isa(name)
    try:
        yield
    finally:
        torch.ops.llamalab.gemv_set_isa(previous)


def gemv(x: Tensor, weight: Tensor, other: Tensor | None = None, float_out: bool = False, *,
         norm: Tensor | None = None, eps: float = 1e-5, swiglu: bool = False) -> Tensor:
    """``x W^T`` (plus ``other`` if given, rounded once) in ``x``'s dtype, ``x`` (..., in) of up to
    :data:`MAX_ROWS` rows, ``weight`` the contiguous ``(out, in)`` matrix, bf16 or fp32 like ``x``.

    ``float_out`` (bf16): the fp32 sums as they are, unrounded (for logits). ``norm``: multiply
    ``RMSNorm(x) * norm`` instead of ``x`` (``eps`` as the model's). ``swiglu``: ``x`` holds the
    feed-forward's gate and up halves (2 x in features); multiply ``silu(gate) * up``. Both are
    computed in fp32 inside the call (the unfused path rounds them to the model's dtype).
    """
    if _built != "":  # not loaded yet (the first call builds it), or it cannot be
        if torch.compiler.is_compiling():  # a build cannot be traced
            raise RuntimeError("llamalab gemv: call gemv_available() before compiling code that uses it")
        reason = unavailable_reason(x.dtype)
        if reason:
            raise RuntimeError(f"llamalab gemv: {reason}")
    return torch.ops.llamalab.gemv(x, weight, other, float_out, norm, eps, swiglu)


def _attention_ready(dtype: torch.dtype) -> None:
    """Raise, saying why, unless the attention op is built and runs ``dtype`` here."""
    if _built != "":
        if torch.compiler.is_compiling():
            raise RuntimeError("llamalab decode_attention: call gemv_available() before compiling code that uses it")
        reason = unavailable_reason(dtype)
        if reason:
            raise RuntimeError(f"llamalab decode_attention: {reason}")


def decode_attention(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                     n_heads: int, n_kv_heads: int) -> Tensor:
    """One decode step's attention of a layer, in one call (``csrc/attention.cpp``).

    ``qkv`` (B, [1,] (n_heads + 2 n_kv_heads) head_dim): the new token's query, key and value
    heads as the fused q/k/v product gives them; ``rope`` (head_dim/2, 2): the (cos, sin) pairs of
    position ``pos``; ``k_cache, v_cache`` (B_max, n_kv_heads, T, head_dim), contiguous, in the
    model's dtype or a 16-bit one (f16 / bf16 under an fp32 model: stored rounded, read widened
    exactly). Rotates the query and key, writes key and value into slot ``pos`` of batch rows
    ``[0, B)``, and returns every query head's attention over slots ``[0, pos]`` (B, [1,]
    n_heads head_dim), computed in fp32 and rounded once to the model's dtype.
    """
    _attention_ready(qkv.dtype)
    return torch.ops.llamalab.decode_attention(qkv, rope, k_cache, v_cache, pos, n_heads, n_kv_heads)


def decode_attention_rows(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                          n_heads: int, n_kv_heads: int) -> Tensor:
    """:func:`decode_attention` with each batch row at its own position (continuous batching).

    ``positions`` (B,) int64: row ``b``'s new token goes into slot ``positions[b]`` and attends
    over slots ``[0, positions[b]]``; ``rope`` (B, head_dim/2, 2): each row's (cos, sin) pairs.
    """
    _attention_ready(qkv.dtype)
    return torch.ops.llamalab.decode_attention_rows(qkv, rope, k_cache, v_cache, positions, n_heads, n_kv_heads)
