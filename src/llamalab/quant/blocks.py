"""GGUF's block formats, and the pure-PyTorch reference that turns blocks back into floats.

A quantized GGUF tensor of shape (out, in) is stored row by row, each row ``in / block_size``
blocks of ``block_bytes`` bytes: an ``(out, row_bytes)`` uint8 matrix, which is how llamalab
keeps it (a view of the file's memory map). Layouts (ggml-common.h):

- ``Q8_0``: fp16 d, then 32 int8 q: w = d q.
- ``Q4_0``: fp16 d, then 16 bytes: element i (< 16) in the low nibble of byte i, element 16 + i
  in its high nibble: w = d (q - 8).
- ``Q4_1``: fp16 d, fp16 m, then the nibbles as Q4_0: w = d q + m.

:func:`dequantize` is the reference the kernels are tested against (and the path that runs where
they cannot be built); K-quants and the other types go through gguf-py's numpy dequantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its ggml id, weights per block and bytes per block."""

    name: str
    ggml_id: int
    block_size: int
    block_bytes: int
    kernel: bool  # llamalab's kernels multiply it in its blocks


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18, True),
    BlockType("Q4_1", 3, 32, 20, True),
    BlockType("Q5_0", 6, 32, 22, True),
    BlockType("Q5_1", 7, 32, 24, True),
    BlockType("Q8_0", 8, 32, 34, True),
    BlockType("Q3_K", 11, 256, 110, False),
    BlockType("Q4_K", 12, 256, 144, True),
    BlockType("Q6_K", 14, 256, 210, True),
)}

KERNEL_TYPES = tuple(name for name, t in BLOCK_TYPES.items() if t.kernel)
# The types dequantized in torch here (and by the C++ loop); the others through gguf-py.
TORCH_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown block type {name!r}; known: {', '.join(BLOCK_TYPES)}") from None


def row_bytes(name: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights in blocks of type ``name``."""
    t = block_type(name)
    if in_features % t.block_size:
        raise ValueError(f"{name} rows hold whole blocks of {t.block_size} weights, not {in_features}")
    return in_features // t.block_size * t.block_bytes


def _half(blocks: Tensor, at: int) -> Tensor:
    """The fp16 field at byte ``at`` of every block, as fp32 (..., n_blocks, 1)."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(..., 16) bytes -> (..., 32) values 0..15: low nibbles are elements 0-15, high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


def dequantize(blocks: Tensor, type_name: str, in_features: int, dtype: torch.dtype = torch.float32, *,
               fast: bool = True) -> Tensor:
    """``blocks`` (out, row_bytes) uint8 -> the (out, in_features) weight in ``dtype``.

    Q8_0 / Q4_0 / Q4_1: by the C++ kernel's loop where it is built (``fast``), else in torch
    (vectorised over the whole matrix; the reference, equal bit for bit); other types through
    ``gguf.quants.dequantize``.
    """
    t = block_type(type_name)
    out = blocks.shape[0]
    if type_name in TORCH_TYPES and fast and blocks.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from llamalab.quant.kernels import kernel_available

        if kernel_available():  # the C++ loop: ~10x torch's elementwise ops on these shapes
            return torch.ops.llamalab_quant.dequantize(blocks.contiguous(), t.ggml_id, dtype == torch.bfloat16)
    if type_name not in TORCH_TYPES:
        import gguf

        values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[type_name])
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(out, in_features).to(dtype)
    b = blocks.reshape(out, in_features // t.block_size, t.block_bytes)
    d = _half(b, 0)
    if type_name == "Q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    elif type_name == "Q4_0":
        w = d * (_nibbles(b[..., 2:]) - 8.0)
    else:  # Q4_1
        w = d * _nibbles(b[..., 4:]) + _half(b, 2)
    return w.reshape(out, in_features).to(dtype)


def dequantize_rows(blocks: Tensor, type_name: str, in_features: int, rows: Tensor,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows ``rows`` (any shape of indices) of the quantized matrix, as (*rows.shape, in_features)."""
    picked = blocks[rows.reshape(-1)]
    return dequantize(picked, type_name, in_features, dtype).reshape(*rows.shape, in_features)


def _round_half_away(v: Tensor) -> Tensor:
    """Round to nearest, halves away from zero, exactly as gguf-py's ``np_roundf`` (and C's roundf)."""
    a = v.abs()
    floored = a.floor()
    return torch.sign(v) * (floored + (2 * (a - floored)).floor())


def quantize(weight: Tensor, type_name: str) -> Tensor:
    """Round-to-nearest of a (rows, in) float weight into GGUF blocks: uint8 (rows, row_bytes).

    Q8_0, Q4_0 and Q4_1 in torch, operation for operation as ``gguf.quants.quantize`` computes
    them in float32 (bit-equal: tests/test_quant.py): Q8_0 ``d = max|w| / 127``, ``q = round(w / d)``;
    Q4_0 ``d = w_m / -8`` for the block's value of largest magnitude ``w_m``, ``q = trunc(w / d +
    8.5)`` clipped to 0..15; Q4_1 ``d = (max - min) / 15``, ``m = min``, ``q = trunc((w - min) / d +
    0.5)``. A block of zeros has d = 0 and q = 0 (Q4_0: 8).
    """
    if type_name not in TORCH_TYPES:
        raise ValueError(f"quantize: {type_name} is not one of {', '.join(TORCH_TYPES)} (llamalab.quant.grids "
                         f"writes the others)")
    rows, cols = weight.shape
    row_bytes(type_name, cols)  # checks whole blocks
    x = weight.detach().to(torch.float32).reshape(rows, cols // 32, 32)

    def inverse(d: Tensor) -> Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1 / d)

    if type_name == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        q = _round_half_away(x * inverse(d)).to(torch.int8).view(torch.uint8)
        fields = [d.half().view(torch.uint8)]
    else:
        if type_name == "Q4_0":
            extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))
            d = extreme / -8
            q = torch.trunc(x * inverse(d) + 8.5)
            fields = [d.half().view(torch.uint8)]
        else:
            low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            d = (high - low) / 15
            q = torch.trunc((x - low) * inverse(d) + 0.5)
            fields = [d.half().view(torch.uint8), low.half().view(torch.uint8)]
        # As gguf-py: to uint8 (values are >= 0 here), then clipped to 4 bits; elements 0-15 in the
        # low nibbles, 16-31 in the high ones.
        q = q.to(torch.uint8).clamp(0, 15)
        q = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([*fields, q], dim=-1).reshape(rows, -1)
