"""Building llamalab's C++ kernels on the user's machine: torch's extension loader, once, cached.

The kernels (``generate/csrc``, ``quant/csrc``) ship as sources and are compiled at first use
with ``torch.utils.cpp_extension.load`` (``-O3 -fopenmp``; cached under
``TORCH_EXTENSIONS_DIR``, rebuilt when a source or a flag changes). :func:`build_extension`
returns '' on success or one line saying why not, so that every caller can fall back to a
reference path instead of failing.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import zlib
from pathlib import Path


def build_extension(name: str, sources: list[Path], headers: list[Path] = (), *, disable_env: str = "",
                    what: str = "kernel") -> str:
    """Build and load the extension ``name`` from ``sources``; '' on success, else why not.

    ``headers`` are included sources: torch's loader does not watch them, so their checksum goes
    into the flags. ``disable_env`` names an environment variable that, set to 0, refuses the
    build (tests and users can force the fallback).
    """
    if disable_env and os.environ.get(disable_env, "1") == "0":
        return f"disabled by {disable_env}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the {what} is for x86-64, this machine is {platform.machine()}"
    try:
        from torch.utils import cpp_extension

        build_dir = getattr(cpp_extension, "_get_build_directory", None)  # private: guarded
        where = Path(build_dir(name, False)) if build_dir is not None else None
        fresh = where is not None and not (where / f"{name}.so").exists()
        if where is not None and (where / "lock").exists() and time.time() - (where / "lock").stat().st_mtime > 600:
            # A build killed half-way leaves its lock file, on which torch's loader would wait
            # forever; a real build takes seconds.
            (where / "lock").unlink(missing_ok=True)
        if fresh:
            print(f"llamalab: building the {what} (once, ~10-30 s) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        crc = zlib.crc32(b"".join(h.read_bytes() for h in headers)) if headers else 0
        # -fopenmp: the kernels split rows over torch's intra-op threads with at::parallel_for,
        # an OpenMP region compiled into the caller.
        cpp_extension.load(name=name, sources=[str(s) for s in sources],
                           extra_cflags=["-O3", "-fopenmp", f"-DLLAMALAB_HEADER_CRC={crc}"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        if fresh:
            print(f"llamalab: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    except Exception as e:  # no compiler, no ninja, a failed build: the caller's fallback serves
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        return f"building {sources[0].name} failed: {first_error or type(e).__name__}"
    return ""
