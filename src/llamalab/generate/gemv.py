"""Matrix-vector products for decoding on AVX-512 CPUs, bf16 and fp32 (``csrc/gemv.cpp``).

A decode step multiplies each weight matrix by one vector (one row per sequence of the
batch), so it runs at the speed the weights stream from memory. On the 2-core reference CPU
oneDNN's kernels read SmolLM2-135M's matrices at 22-38 GB/s (bf16) and ~30 GB/s (fp32), a
plain read reaches ~47 GB/s; this kernel reads the weights as they are (row-major, no copy)
at 41-46 GB/s: the model's 121 products per token 7.7 -> 6.1 ms in bf16, 17.7 -> 11.8 ms in
fp32 (measured in one run). bf16 needs AVX512-BF16, fp32 AVX-512.

Built on first use with torch's C++ extension loader (``torch.utils.cpp_extension``, ~10 s,
cached under ``TORCH_EXTENSIONS_DIR``), registered as ``torch.ops.llamalab.gemv`` with a
shape rule so that ``torch.compile`` can call it. Where it cannot be had (not x86-64, a CPU
without the instructions, no C++ compiler or ninja, or ``LLAMALAB_GEMV=0`` in the
environment) :func:`gemv_available` is False and callers keep oneDNN's kernels;
:func:`unavailable_reason` says why.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["gemv_available", "unavailable_reason", "gemv", "MAX_ROWS"]

log = logging.getLogger(__name__)

# Rows of x (sequences of a batched step) the kernel takes: the first row reads the weights from
# memory, the others find each group of rows in L1/L2. Larger products (prefill) are GEMMs.
MAX_ROWS = 4

_SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
_NAME = "llamalab_gemv"
_lock = threading.Lock()
_built: str | None = None  # '' once loaded, else why not


def _build() -> str:
    """Build and load the extension; '' on success, else why not."""
    if os.environ.get("LLAMALAB_GEMV", "1") == "0":
        return "disabled by LLAMALAB_GEMV=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is for x86-64, this machine is {platform.machine()}"
    try:
        from torch.utils import cpp_extension

        build_dir = getattr(cpp_extension, "_get_build_directory", None)  # private: guarded
        where = Path(build_dir(_NAME, False)) if build_dir is not None else None
        fresh = where is not None and not (where / f"{_NAME}.so").exists()
        if where is not None and (where / "lock").exists() and time.time() - (where / "lock").stat().st_mtime > 600:
            # A build killed half-way leaves its lock file, on which torch's loader would wait
            # forever; a real build takes seconds.
            (where / "lock").unlink(missing_ok=True)
        if fresh:
            print("llamalab: building the decode kernel (once, ~10-30 s) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        # -fopenmp: the kernel splits rows over torch's intra-op threads with at::parallel_for,
        # which is an OpenMP region compiled into the caller.
        cpp_extension.load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        if fresh:
            print(f"llamalab: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    except Exception as e:  # no compiler, no ninja, a failed build: oneDNN serves instead
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        return f"building {_SOURCE.name} failed: {first_error or type(e).__name__}"
    try:
        torch.library.register_fake("llamalab::gemv")(_gemv_shape)
    except RuntimeError:  # registered already (the library was loaded before in this process)
        pass
    return ""


def _gemv_shape(x: Tensor, weight: Tensor, other: Tensor | None = None, float_out: bool = False) -> Tensor:
    """The output's shape and dtype, for tracing: x's leading dimensions, then the weight's rows."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if float_out else x.dtype)


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
    if not torch.ops.llamalab.gemv_supported(dtype == torch.bfloat16):
        return "this CPU lacks " + ("AVX512-BF16" if dtype == torch.bfloat16 else "AVX-512")
    return ""


def gemv_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when the kernel is built, loaded, and this CPU runs it on ``dtype`` weights."""
    return not unavailable_reason(dtype)


def gemv(x: Tensor, weight: Tensor, other: Tensor | None = None, float_out: bool = False) -> Tensor:
    """``x W^T`` (plus ``other`` if given, rounded once) in ``x``'s dtype, ``x`` (..., in) of up to
    :data:`MAX_ROWS` rows, ``weight`` the contiguous ``(out, in)`` matrix, bf16 or fp32 like ``x``.

    ``float_out`` (bf16): the fp32 sums as they are, unrounded (for logits).
    """
    if _built != "":  # not loaded yet (the first call builds it), or it cannot be
        if torch.compiler.is_compiling():  # a build cannot be traced
            raise RuntimeError("llamalab gemv: call gemv_available() before compiling code that uses it")
        reason = unavailable_reason(x.dtype)
        if reason:
            raise RuntimeError(f"llamalab gemv: {reason}")
    return torch.ops.llamalab.gemv(x, weight, other, float_out)
