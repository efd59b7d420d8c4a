"""Keep freed host memory for reuse instead of handing it back to the OS after every step.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every large block
(above ``M_MMAP_THRESHOLD``, at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap`` when freed, so a training step that allocates the same activations, logits and
gradients as the step before pays the kernel's page faults (zeroing every new page) again,
every step. In a virtual machine that is slow: measured on the 2-core development VM, a
bf16 step of the 15M model took 0.66 s with glibc's defaults and 0.47 s with freed memory
kept in the heap (the same effect that jemalloc or tcmalloc, preloaded, give; Intel's PyTorch
CPU tuning guide recommends them for this reason).

:func:`reuse_freed_memory` asks glibc (``mallopt``) to serve all blocks from the heap
(``M_MMAP_MAX = 0``) and not to trim it (``M_TRIM_THRESHOLD``), so freed blocks are reused
without new page faults. The cost: the process keeps its peak memory until it exits, which a
training or evaluation job does anyway. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_applied = False


def reuse_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module doc); True if it applied.

    Idempotent; a no-op returning False where the C library is not glibc.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


__all__ = ["reuse_freed_memory"]
