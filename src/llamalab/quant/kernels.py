"""llamalab's products on GGUF blocks (``csrc/qmatmul.cpp``): built on first use, dispatched per CPU.

:func:`qmatmul` multiplies fp32 activations by one or more Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q6_K weights kept in
their blocks: each row of x is quantized to int8 per block of 32 (as llama.cpp's q8 activations),
each block pair is one integer dot product scaled once (AVX2 ``VPMADDUBSW``/``VPMADDWD``, or
AVX-512 VNNI ``VPDPBUSD``), and several weights that read the same x (a layer's q, k and v) are
one call with their outputs side by side. Optional RMSNorm or SwiGLU of x first and a residual
added after, as the decode kernel (``llamalab.generate.gemv``) does.

Paths: ``avx2`` (AVX2 + FMA + F16C), ``avx512vnni`` (AVX-512F/BW/VL + VNNI) and ``amx`` (those, and
AMX int8 tiles for products of many rows of x, bf16 tiles for prompts of 16 tokens or more: prefill, batched
decode), chosen by what the CPU
(and, for AMX, the OS) reports; ``LLAMALAB_QUANT_ISA=avx2|avx512vnni|amx`` or :func:`use_isa`
forces one the CPU has.
Where the kernel cannot be had (not x86-64, no AVX2, no compiler or ninja, ``LLAMALAB_QUANT=0``)
:func:`kernel_available` is False, :func:`unavailable_reason` says why, and
:class:`~llamalab.quant.linear.QuantizedLinear` runs the pure-PyTorch reference instead.
Registered as ``torch.ops.llamalab_quant.qmatmul`` with a shape rule, so ``torch.compile`` can
trace it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from llamalab.quant.blocks import block_type

__all__ = ["kernel_available", "unavailable_reason", "qmatmul", "isa", "available_isas", "use_isa", "bf16_min_tokens"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "qmatmul.cpp"
_HEADER = Path(__file__).parents[1] / "generate" / "csrc" / "x86_simd.h"  # included
_NAME = "llamalab_quant"
_lock = threading.Lock()
_built: str | None = None  # '' once loaded, else why not


def _build() -> str:
    from llamalab.cext import build_extension

    reason = build_extension(_NAME, [_SOURCE], [_HEADER], disable_env="LLAMALAB_QUANT", what="quantized-matmul kernel")
    if reason:
        return reason
    for op, rule in (("qmatmul", _shape), ("dequantize", _dequantized_shape)):
        try:
            torch.library.register_fake(f"llamalab_quant::{op}")(rule)
        except RuntimeError:  # registered already (loaded before in this process)
            pass
    forced = os.environ.get("LLAMALAB_QUANT_ISA", "auto").strip().lower() or "auto"
    try:
        torch.ops.llamalab_quant.set_isa(forced)
    except RuntimeError as e:
        return f"LLAMALAB_QUANT_ISA={forced}: {str(e).splitlines()[0]}"
    if torch.ops.llamalab_quant.isa() == "none":
        return "this CPU has neither AVX2+FMA+F16C nor AVX-512 VNNI"
    return ""


def _shape(x: Tensor, weights: list[Tensor], types: list[int], other: Tensor | None = None,
           norm: Tensor | None = None, eps: float = 1e-5, swiglu: bool = False) -> Tensor:
    """The output's shape for tracing: x's leading dimensions, then every weight's rows."""
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def _dequantized_shape(blocks: Tensor, type: int, bf16: bool = False) -> Tensor:
    """The dequantized matrix's shape for tracing (Q4_0 / Q4_1 / Q8_0 rows of whole blocks)."""
    block_bytes = {2: 18, 3: 20, 8: 34}[type]
    return blocks.new_empty((blocks.shape[0], blocks.shape[1] // block_bytes * 32),
                            dtype=torch.bfloat16 if bf16 else torch.float32)


def unavailable_reason() -> str:
    """Why the kernel cannot run here ('' when it can); builds it on the first call."""
    global _built
    if _built is None:
        with _lock:
            if _built is None:
                _built = _build()
                if _built:
                    log.info("quantized-matmul kernel unavailable (%s); using the PyTorch reference", _built)
    return _built


def kernel_available() -> bool:
    """True when the kernel is built, loaded and runs on this CPU."""
    return not unavailable_reason()


def isa() -> str:
    """The path in use ("avx2", "avx512vnni", "amx"), or "none: <why>"."""
    reason = unavailable_reason()
    return f"none: {reason}" if reason else torch.ops.llamalab_quant.isa()


def available_isas() -> list[str]:
    """The paths this CPU can run, best last ([] where the kernel cannot be built)."""
    return [] if unavailable_reason() else list(torch.ops.llamalab_quant.isas())


@contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernel on path ``name`` (one of :func:`available_isas`, or "auto") inside the block."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"llamalab qmatmul: {reason}")
    previous = torch.ops.llamalab_quant.set_isa(name)
    try:
        yield
    finally:
        torch.ops.llamalab_quant.set_isa(previous)


def bf16_min_tokens() -> int:
    """From how many tokens of one prompt (x of shape (..., tokens, k)) the current path multiplies
    on AMX's bf16 tiles rather than on int8 products (0: it never does here). Their rounding
    differs, so a prompt shorter than this must not be padded to it by a longer one in a batched
    prefill if its answer is to equal its alone run's (``ContinuousBatcher`` sees to it)."""
    return 0 if unavailable_reason() else int(torch.ops.llamalab_quant.bf16_min_tokens())


def qmatmul(x: Tensor, weights: Sequence[Tensor], types: Sequence[str], other: Tensor | None = None, *,
            norm: Tensor | None = None, eps: float = 1e-5, swiglu: bool = False) -> Tensor:
    """``x W_1^T | x W_2^T | ...`` (fp32, (..., sum of rows)), ``weights`` uint8 (rows, row_bytes) blocks
    of ``types`` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K), all with x's columns; ``x`` fp32 (..., in).

    ``norm``: RMSNorm(x) * norm first (``eps`` as the model's); ``swiglu``: x holds gate and up
    (2 x in features), multiply silu(gate) * up; ``other``: added to the result (the residual).
    """
    if _built != "":
        if torch.compiler.is_compiling():
            raise RuntimeError("llamalab qmatmul: call kernel_available() before compiling code that uses it")
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"llamalab qmatmul: {reason}")
    ids = [block_type(t).ggml_id for t in types]
    return torch.ops.llamalab_quant.qmatmul(x, list(weights), ids, other, norm, eps, swiglu)
