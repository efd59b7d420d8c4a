"""The GPTQ checkpoint format of AutoGPTQ, transformers and optimum (``"quant_method": "gptq"`` in
``config.json``): how the 3- and 4-bit LLaMA releases on the Hugging Face hub are stored.

An HF ``LlamaForCausalLM`` directory whose linears ``model.layers.N.*_proj`` are replaced by

- ``qweight`` int32 (in * bits / 32, out): the integers q of each output column, packed along the
  input dimension as a little-endian bit stream (element t at bit ``bits * t``; 3-bit values cross
  word boundaries every 32 elements, as AutoGPTQ's packer lays them out);
- ``qzeros`` int32 (groups, out * bits / 32): the zero points, packed the same way along the output
  dimension, stored minus one (``checkpoint_format`` "gptq", AutoGPTQ's v1) or as they are
  ("gptq_v2", GPTQModel's);
- ``scales`` fp16 (groups, out), and ``g_idx`` int32 (in): the group of each input;

with ``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``. The q/k projections' rows
are in HF's rotary layout, as every HF LLaMA weight. Everything else (embedding, norms, head)
stays a float tensor.

llamalab reads such directories (:func:`gptq_modules`, called by the HF reader: weights
dequantized when looked up) and writes them (``llamalab quantize --format gptq``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamalab.checkpoint.base import Checkpoint, CheckpointError

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """(n, cols) integers in 0..2^bits-1 -> int32 (n * bits / 32, cols): each column a bit stream."""
    n, cols = q.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} rows of {bits}-bit values do not fill whole 32-bit words")
    q = q.to(torch.int64)
    pos = torch.arange(n) * bits
    word, shift = pos // 32, pos % 32
    out = torch.zeros(n * bits // 32, cols, dtype=torch.int64)
    out.index_add_(0, word, (q << shift.unsqueeze(1)) & 0xFFFFFFFF)  # disjoint bits: add is or
    spill = shift + bits > 32
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, q[spill] >> (32 - shift[spill]).unsqueeze(1))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 (n * bits / 32, cols) -> int32 (n, cols).

    Whole words at a time, with fixed shifts (3 bits: 32 values in 3 words, two of them split):
    ~10x the per-element gather it replaces, which made loading a 135M model take seconds."""
    cols = packed.shape[1]
    words = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = (torch.arange(32 // bits, dtype=torch.int32) * bits).view(1, -1, 1)
        return ((words.unsqueeze(1) >> shifts) & mask).reshape(n, cols)
    if bits != 3:
        raise ValueError(f"{bits}-bit GPTQ weights: llamalab reads 2, 3, 4 and 8 bits")
    w0, w1, w2 = words.view(-1, 3, cols).unbind(1)
    ten = (torch.arange(10, dtype=torch.int32) * 3).view(1, -1, 1)
    parts = [(w0.unsqueeze(1) >> ten) & 7,
             (((w0 >> 30) & 3) | ((w1 & 1) << 2)).unsqueeze(1),
             (w1.unsqueeze(1) >> (ten + 1)) & 7,
             (((w1 >> 31) & 1) | ((w2 & 3) << 1)).unsqueeze(1),
             (w2.unsqueeze(1) >> (ten + 2)) & 7]
    return torch.cat(parts, dim=1).reshape(n, cols)


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None, bits: int,
                    *, v2: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """One GPTQ linear -> its (out, in) weight (HF layout)."""
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_rows(qweight, bits, in_features)  # (in, out)
    zeros = unpack_rows(qzeros.T.contiguous(), bits, out_features).T  # (groups, out)
    if not v2:
        zeros = zeros + 1  # AutoGPTQ's v1 stores zero - 1
    if g_idx is None:
        g_idx = torch.arange(in_features) // (in_features // scales.shape[0])
    g = g_idx.to(torch.int64)
    if bool((g == torch.arange(in_features) // max(1, in_features // scales.shape[0])).all()):
        # Consecutive groups (no act-order permutation): one broadcast per group, no gathers.
        groups = scales.shape[0]
        qg = q.view(groups, in_features // groups, out_features).float()
        w = (qg - zeros.view(groups, 1, out_features).float()) * scales.float().view(groups, 1, out_features)
        w = w.view(in_features, out_features)
    else:
        w = scales.float()[g] * (q - zeros[g]).float()
    return w.T.contiguous().to(dtype)


def quantization_config(path: Path) -> dict[str, Any] | None:
    """``config.json``'s GPTQ ``quantization_config`` (checked), or None for a float checkpoint."""
    cfg_path = path / "config.json"
    try:
        q = json.loads(cfg_path.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    if not q:
        return None
    method = q.get("quant_method")
    if method != "gptq":
        raise CheckpointError(f"{cfg_path}: quantization_config.quant_method {method!r} is not supported "
                              f"(llamalab reads 'gptq'; for GGUF files give the .gguf)")
    if q.get("bits") not in BITS:
        raise CheckpointError(f"{cfg_path}: quantization_config.bits {q.get('bits')!r}; expected one of {BITS}")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: quantization_config.checkpoint_format {fmt!r}; expected 'gptq' or "
                              f"'gptq_v2'")
    return q


def gptq_modules(tensors: dict[str, Tensor], qcfg: dict[str, Any], want: dict[str, tuple[int, ...]],
                 file: Path) -> dict[str, Any]:
    """{HF weight name: a function building its (out, in) fp32 weight} for the GPTQ linears among
    ``tensors`` (one safetensors file), which it empties of their ``qweight``/``qzeros``/... entries.
    ``want`` gives each HF weight name's (out, in) shape; wrong shapes are a CheckpointError."""
    bits = int(qcfg["bits"])
    v2 = qcfg.get("checkpoint_format") == "gptq_v2"
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in ("qweight", "qzeros")})
    out: dict[str, Any] = {}
    for prefix in prefixes:
        parts = {s: tensors.pop(f"{prefix}.{s}", None) for s in SUFFIXES}
        name = f"{prefix}.weight"
        for s in ("qweight", "qzeros", "scales"):
            if parts[s] is None:
                raise CheckpointError(f"{file}: {prefix}.{s} missing (a GPTQ linear has qweight, qzeros, scales)")
        if name not in want:
            raise CheckpointError(f"{file}: unexpected GPTQ linear {prefix} (not part of a LLaMA model)")
        o, i = want[name]
        shapes = {"qweight": (i * bits // 32, o), "scales": (parts["scales"].shape[0], o),
                  "qzeros": (parts["scales"].shape[0], o * bits // 32), "g_idx": (i,)}
        for s, shape in shapes.items():
            t = parts[s]
            if t is not None and tuple(t.shape) != shape:
                raise CheckpointError(f"{file}: {prefix}.{s} has shape {list(t.shape)}, expected {list(shape)} "
                                      f"for {bits}-bit weights of shape [{o}, {i}]")
        groups = parts["scales"].shape[0]
        if parts["g_idx"] is None and i % groups:
            raise CheckpointError(f"{file}: {prefix}: {groups} groups do not divide {i} inputs and no g_idx")
        if parts["g_idx"] is not None and int(parts["g_idx"].max()) >= groups:
            raise CheckpointError(f"{file}: {prefix}.g_idx names group {int(parts['g_idx'].max())}; there are "
                                  f"{groups}")
        out[name] = (lambda p=parts: dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, v2=v2))
    return out


def write_gptq(ckpt: Checkpoint, dst: str | os.PathLike[str], quantized: dict[str, dict[str, Tensor]], *,
               bits: int, group_size: int, sym: bool, desc_act: bool, damp: float | None = None,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``ckpt`` as a GPTQ HF directory: the Meta-named weights in ``quantized`` as GPTQ linears
    ({"q": (out, in) ints, "scales": (out, groups), "zeros": (out, groups) ints}, Meta layout), the
    rest as ``dtype`` tensors (fp16, as AutoGPTQ writes them)."""
    from llamalab.checkpoint import convert
    from llamalab.checkpoint.hf import write_hf

    c = ckpt.config
    packed: dict[str, Tensor] = {}
    for name, part in quantized.items():
        hf_name = convert.meta_name_to_hf(name)
        prefix = hf_name.removesuffix(".weight")
        # Rows are independent in GPTQ: HF's rotary row order is a permutation of the results.
        q = convert.meta_to_hf_tensor(name, part["q"].to(torch.int64), c)[1]
        scales = convert.meta_to_hf_tensor(name, part["scales"], c)[1]
        zeros = convert.meta_to_hf_tensor(name, part["zeros"].to(torch.int64), c)[1]
        if bool((zeros < 1).any()):
            raise ValueError(f"{name}: a zero point of 0 cannot be stored in the GPTQ v1 format")
        packed[f"{prefix}.qweight"] = pack_rows(q.T.contiguous(), bits)
        packed[f"{prefix}.qzeros"] = pack_rows(zeros - 1, bits).T.contiguous()
        packed[f"{prefix}.scales"] = scales.T.contiguous().half()
        packed[f"{prefix}.g_idx"] = (torch.arange(q.shape[1]) // group_size).to(torch.int32)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "static_groups": True, "true_sequential": False, "checkpoint_format": "gptq",
            "model_file_base_name": "model"}
    if damp is not None:
        qcfg["damp_percent"] = damp
    return write_hf(ckpt, dst, dtype=dtype, replace=packed, drop=set(quantized), quantization_config=qcfg)


__all__ = ["BITS", "dequantize_gptq", "gptq_modules", "pack_rows", "quantization_config", "unpack_rows",
           "write_gptq"]
