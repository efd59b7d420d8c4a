"""bf16 matrix-vector products for decoding on CPUs with AVX512-BF16 (``csrc/gemv_bf16.cpp``).

A decode step multiplies each weight matrix by one vector (one row per sequence of the
batch), so it runs at the speed the weights stream from memory. On the 2-core reference CPU
oneDNN's bf16 kernels read SmolLM2-135M's matrices at 22-38 GB/s, a plain read reaches ~47 GB/s;
this kernel reads a packed copy front to back at 35-50 GB/s (the model's 121 products per token:
7.8 -> 6.2 ms, measured in one run). Built on first use with torch's C++ extension loader
(``torch.utils.cpp_extension``, ~10 s, cached under ``TORCH_EXTENSIONS_DIR``), registered as
``torch.ops.llamalab.gemv_bf16`` with a shape rule so that ``torch.compile`` can call it.

Where it cannot be had (not x86-64, a CPU without AVX512-BF16, no C++ compiler or ninja, or
``LLAMALAB_BF16_GEMV=0`` in the environment) :func:`bf16_gemv_available` is False and callers
keep oneDNN's kernels; :func:`unavailable_reason` says why.
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

__all__ = ["bf16_gemv_available", "unavailable_reason", "pack_bf16", "gemv_bf16", "MAX_ROWS"]

log = logging.getLogger(__name__)

# Rows of x (sequences of a batched step) up to which the kernel is used: up to 4 rows share
# one pass over the weights (one load, four products), and take the time of one row. Measured
# against oneDNN on SmolLM2's shapes: 1-4 rows 15-40% faster, 8 even, 16 rows 1.6x slower.
MAX_ROWS = 4

_SOURCE = Path(__file__).with_name("csrc") / "gemv_bf16.cpp"
_NAME = "llamalab_gemv_bf16"
_lock = threading.Lock()
_available: bool | None = None
_reason = ""


def _build() -> str:
    """Build and load the extension; '' on success, else why not."""
    if os.environ.get("LLAMALAB_BF16_GEMV", "1") == "0":
        return "disabled by LLAMALAB_BF16_GEMV=0"
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
            print("llamalab: building the bf16 decode kernel (once, ~10-30 s) ...", file=sys.stderr, flush=True)
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
    if not torch.ops.llamalab.gemv_bf16_supported():
        return "this CPU lacks AVX512-BF16"
    try:
        torch.library.register_fake("llamalab::gemv_bf16")(_gemv_shape)
    except RuntimeError:  # registered already (the library was loaded before in this process)
        pass
    return ""


def _gemv_shape(x: Tensor, packed: Tensor, n: int, other: Tensor | None = None, float_out: bool = False) -> Tensor:
    """The output's shape and dtype, for tracing: x's leading dimensions, then ``n``."""
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32 if float_out else x.dtype)


def bf16_gemv_available() -> bool:
    """True when the kernel is built, loaded and this CPU runs it (decided once per process)."""
    global _available, _reason
    if _available is None:
        with _lock:
            if _available is None:
                _reason = _build()
                _available = not _reason
                if _reason:
                    log.info("bf16 matrix-vector kernel unavailable (%s); using oneDNN", _reason)
    return _available


def unavailable_reason() -> str:
    """Why :func:`bf16_gemv_available` is False ('' when it is True or not yet asked)."""
    return _reason


def pack_bf16(weight: Tensor) -> Tensor:
    """The kernel's copy of a bf16 ``(out, in)`` weight: 16 rows x 2 columns per 64 bytes."""
    return torch.ops.llamalab.gemv_bf16_pack(weight.detach().contiguous())


def gemv_bf16(x: Tensor, packed: Tensor, n: int, other: Tensor | None = None, float_out: bool = False) -> Tensor:
    """``x W^T`` (plus ``other`` if given, rounded once) in bf16, for ``x`` (..., in) of few rows.

    ``packed`` is :func:`pack_bf16` of ``W``, ``n`` its number of rows (outputs). ``float_out``:
    the fp32 sums as they are, unrounded (for logits).
    """
    return torch.ops.llamalab.gemv_bf16(x, packed, n, other, float_out)
