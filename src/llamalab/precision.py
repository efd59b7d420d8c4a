"""Which floating-point precision a device computes fast: ``precision = "auto"`` and ``--dtype auto``.

bf16 halves the bytes of every weight and activation, but it only pays where the hardware
multiplies bf16 natively: CUDA GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX (oneDNN's
bf16 kernels). Elsewhere torch's bf16 matrix products fall back to scalar code: on a 2-core
AVX2-only EPYC (torch 2.13) a bf16 GEMM runs at ~1.2 GFLOP/s against fp32's ~67, so bf16
training there is ~50x slower than fp32 (measured: the Shakespeare recipe 68 against 1,118
tok/s). ``auto`` therefore means bf16 where it is native and fp32 elsewhere; asking for bf16
explicitly where it is not native still works, with one warning saying what it costs.

Inference is the exception: llamalab's decode kernel (:mod:`llamalab.generate.gemv`) widens bf16
weights to fp32 in registers, so on an AVX2 CPU bf16 weights decode faster than fp32 ones (half
the bytes to stream); ``--dtype bfloat16`` is the fast choice there for generation, while
``auto`` keeps fp32 for its exactness and its faster prefill.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "cpu_name", "cpu_flags", "native_bf16", "resolve_precision", "resolve_dtype", "parse_dtype",
           "dtype_name", "describe_hardware", "hardware_line"]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPE_NAMES = {"auto": "auto", "float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}
_warned: set[str] = set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm64
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: "torch.device | str" = "cpu") -> bool:
    """True when ``device`` multiplies bf16 matrices natively (fast), False when torch emulates it."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # accelerators (MPS, XPU, ...) are bf16 machines
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: "torch.device | str" = "cpu", *, what: str = "training") -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` has native bf16, else ``"fp32"``; ``"fp32"``/``"bf16"``
    as given (also accepts ``float32``/``bfloat16``). An explicit bf16 on a device without native
    bf16 logs one warning per process and ``what`` with the expected slowdown."""
    name = _DTYPE_NAMES.get(str(precision).lower())
    if name is None:
        raise ValueError(f"precision {precision!r}: expected one of auto, fp32 (float32), bf16 (bfloat16)")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device) and what not in _warned:
        _warned.add(what)
        log.warning("bf16 %s on a CPU without native bf16 (%s: no AVX512-BF16 or AMX): torch emulates its "
                    "matrix products, ~50x slower than fp32 here; precision auto picks fp32",
                    what, cpu_name())
    return name


def resolve_dtype(name: str, device: "torch.device | str" = "cpu", *, what: str = "inference") -> "torch.dtype":
    """A ``--dtype`` value (``auto``, ``float32``, ``bfloat16``, ``float16`` and short forms) as a torch dtype."""
    import torch

    if str(name).lower() in ("float16", "fp16", "half"):
        return torch.float16
    return torch.bfloat16 if resolve_precision(name, device, what=what) == "bf16" else torch.float32


def parse_dtype(name: str) -> "torch.dtype":
    """A ``--dtype`` flag's value as a torch dtype: ``auto`` (bf16 where the device computes it
    natively, else fp32), ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``;
    anything else is a ValueError naming the choices."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return resolve_dtype("auto")
    if name not in table:
        raise ValueError(f"--dtype {name!r}: expected auto or one of {', '.join(table)}")
    return table[name]


def parse_load_dtype(name: str) -> "torch.dtype | None":
    """A ``--dtype`` value for loading a checkpoint: ``auto`` is None, "as stored" (a quantized
    GGUF runs in its blocks on llamalab's quantized kernels, anything else in the precision
    ``auto`` picks, see :func:`llamalab.load`); other values as :func:`parse_dtype`."""
    return None if name == "auto" else parse_dtype(name)


KV_CACHE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def parse_kv_cache(name: str) -> "torch.dtype | None":
    """A ``--kv-cache`` value: ``auto`` is None (the model's default: f16 for a quantized GGUF, as
    llama.cpp keeps its cache, else the weights' dtype), else that dtype (``float32``/``fp32``,
    ``float16``/``fp16``, ``bfloat16``/``bf16``); anything else is a ValueError naming the choices."""
    if name == "auto":
        return None
    try:
        return parse_dtype(name)
    except ValueError:
        raise ValueError(f"--kv-cache {name!r}: expected one of {', '.join(KV_CACHE_CHOICES)}") from None


def dtype_name(name: str) -> str:
    """The concrete dtype a ``--dtype`` value means here (``auto`` resolved), for logs and result files."""
    return str(parse_dtype(name)).removeprefix("torch.")


def hardware_line() -> str:
    """One line saying which CPU, precision and decode kernel this process uses (``--verbose``)."""
    hw = describe_hardware()
    return (f"llamalab: {hw['cpu']}; features {hw['cpu_features']}; precision auto = {hw['precision_auto']}; "
            f"decode kernel {hw['decode_kernel']}; oneDNN bf16 {hw['onednn_bf16']}")


def describe_hardware(device: "torch.device | str" = "cpu") -> dict[str, str]:
    """What llamalab runs on here: the CPU, its vector extensions, what ``auto`` picks, and the
    paths of the decode kernel and of the quantized-matmul kernel (builds them on first call)."""
    import torch

    flags = cpu_flags()
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                       "amx_int8", "asimd", "sve", "bf16") if f in flags]
    auto = resolve_precision("auto", device)
    from llamalab.generate.gemv import isa as kernel_isa
    from llamalab.quant.kernels import isa as quant_isa

    info = {
        "cpu": f"{cpu_name()} ({platform.machine()}, {torch.get_num_threads()} threads)",
        "cpu_features": " ".join(isa) or "none detected",
        "precision_auto": auto + ("" if auto == "bf16" else " (no native bf16 on this device)"),
        "decode_kernel": kernel_isa(),
        "quantized_kernel": quant_isa(),  # GGUF blocks' products: avx2, avx512vnni, amx, or none: why
        "onednn_bf16": str(bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())),
    }
    return info
