"""llama.cpp (llama-cpp-python) on a GGUF file, as llamalab's benchmarks and tests compare against it.

Optional: llama-cpp-python is not a dependency (``pip install --no-deps llama-cpp-python
diskcache``, built from the sdist, ~10-20 min on 2 cores). On CPUs with AMX, llama.cpp repacks
Q4/Q8 weights for its AMX kernels by default (an "extra buffer type"); in llama-cpp-python
0.3.36 those crash in ``llama_decode`` on any batch of more than one token (measured on the AMX
Xeon). :func:`open_llama_cpp` then turns them off, as llama.cpp's ``--no-repack`` does, so that
llama.cpp multiplies the file's own blocks with its AVX-512 VNNI kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def open_llama_cpp(path: str | Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, verbose=False, **kwargs)``, its AMX repacking off where the CPU has AMX."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params
    if _cpu_has_amx():
        def no_extra_buffers() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = no_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **{"verbose": False, **kwargs})
    finally:
        low.llama_model_default_params = defaults
