"""The quantization grids of GGUF block types: fit a group's scales, round onto them, pack the bytes.

Every type here reconstructs a weight as ``step * (q - qzero) + offset`` with an integer ``q`` in
``qmin..qmax`` and ``step``/``offset`` fixed per block (or sub-block) by scales stored in the
block. A :class:`Grid` holds those numbers per element of a matrix, so round-to-nearest (every
column at once) and GPTQ (one column at a time, in any order, :mod:`llamalab.quant.gptq`) share
one rounding rule, and :meth:`BlockFormat.pack` writes the chosen integers with the scales as
the type's bytes (ggml-common.h's layouts):

- ``Q8_0`` / ``Q4_0`` / ``Q4_1`` (blocks of 32): the scales and rounding of ``gguf.quants.quantize``,
  operation for operation, so round-to-nearest here is bit-equal to gguf-py (and to
  :func:`llamalab.quant.blocks.quantize`; tested).
- ``Q4_K`` (super-blocks of 256 = 8 sub-blocks of 32): ``w = d * sc_j * q - dmin * m_j`` with
  6-bit ``sc_j, m_j`` and fp16 ``d, dmin``; the sub-block's range is its min-max (min clamped to
  at most 0, as llama.cpp does), not llama.cpp's searched scales.
- ``Q3_K`` (super-blocks of 256 = 16 sub-blocks of 16): ``w = d * (sc_j - 32) * (q - 4)``, q in
  0..7, the largest-magnitude weight of a sub-block on the grid's end (-4) and the largest scale
  on -32, as llama.cpp's reference; again without its scale search.

The layouts are checked against gguf-py's dequantizers, an independent reader, in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from llamalab.quant.blocks import _round_half_away


@dataclass
class Grid:
    """Per-element rounding rule of a (rows, cols) matrix: ``q = R((w - sub) * inv + add)`` clamped
    to ``qmin..qmax`` (R = floor, or round-half-away-from-zero), value ``step * (q - qzero) + offset``."""

    sub: Tensor
    inv: Tensor
    add: float | Tensor  # a number, or per element (GPTQ's zero points)
    step: Tensor
    offset: Tensor
    qzero: float | Tensor
    qmin: int
    qmax: int
    half_away: bool = False

    def round(self, w: Tensor, cols: slice | int | Tensor = slice(None)) -> Tensor:
        """The integers (float tensor) for the weights ``w`` of columns ``cols``."""
        add = self.add[:, cols] if isinstance(self.add, Tensor) else self.add
        x = (w - self.sub[:, cols]) * self.inv[:, cols] + add
        q = _round_half_away(x) if self.half_away else torch.floor(x)
        return q.clamp_(self.qmin, self.qmax)

    def value(self, q: Tensor, cols: slice | int | Tensor = slice(None)) -> Tensor:
        """The weights the integers ``q`` of columns ``cols`` stand for, as the file stores them."""
        qzero = self.qzero[:, cols] if isinstance(self.qzero, Tensor) else self.qzero
        return self.step[:, cols] * (q - qzero) + self.offset[:, cols]


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16(t: Tensor) -> Tensor:
    """``t`` rounded to fp16, as a block's stored scale (back in fp32)."""
    return t.half().float()


def _spread(t: Tensor, n: int) -> Tensor:
    """(rows, groups, sub) per-sub-block values -> (rows, groups * sub * n) per element."""
    return t.unsqueeze(-1).expand(*t.shape, n).reshape(t.shape[0], -1)


def _bytes_of_half(t: Tensor) -> Tensor:
    return t.half().contiguous().view(torch.uint8)


@dataclass(frozen=True)
class BlockFormat:
    """How one GGUF type fits scales to a group of ``group`` columns and packs integers into blocks."""

    name: str
    group: int
    fit: Callable[[Tensor], tuple[Grid, dict[str, Tensor]]]
    pack: Callable[[Tensor, dict[str, Tensor]], Any]  # bytes (rows, row_bytes), or GPTQ's fields

    def rtn(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Round-to-nearest of a whole (rows, cols) matrix: (uint8 blocks (rows, row_bytes), the
        dequantized weight)."""
        w = weight.detach().float()
        grid, params = self.fit(w)
        q = grid.round(w)
        return self.pack(q, params), grid.value(q)


def _check(w: Tensor, group: int, name: str) -> tuple[int, int]:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"{name} rows hold whole blocks of {group} weights, not {cols}")
    return rows, cols // group


# --- Q8_0 / Q4_0 / Q4_1 ------------------------------------------------------------------------

def _fit_q8_0(w: Tensor) -> tuple[Grid, dict[str, Tensor]]:
    rows, n = _check(w, 32, "Q8_0")
    x = w.float().reshape(rows, n, 32)
    d = x.abs().amax(-1) / 127
    zero = torch.zeros(rows, n * 32)
    grid = Grid(sub=zero, inv=_spread(_inverse(d), 32), add=0.0, step=_spread(_fp16(d), 32), offset=zero,
                qzero=0.0, qmin=-128, qmax=127, half_away=True)
    return grid, {"d": d}


def _pack_q8_0(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    d = p["d"]
    qs = q.reshape(rows, -1, 32).to(torch.int8).view(torch.uint8)
    return torch.cat([_bytes_of_half(d.unsqueeze(-1)), qs], dim=-1).reshape(rows, -1)


def _fit_symmetric(w: Tensor, name: str, half_levels: int) -> tuple[Grid, dict[str, Tensor]]:
    """Q4_0 (half_levels 8) / Q5_0 (16): ``d = w_m / -half_levels`` for the block's largest-magnitude
    weight ``w_m``; gguf-py's ``trunc(w / d + half_levels + 0.5)``, i.e. floor for the block's own
    weights (all >= -half_levels d)."""
    rows, n = _check(w, 32, name)
    x = w.float().reshape(rows, n, 32)
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = extreme / -half_levels
    zero = torch.zeros(rows, n * 32)
    grid = Grid(sub=zero, inv=_spread(_inverse(d), 32), add=half_levels + 0.5, step=_spread(_fp16(d), 32),
                offset=zero, qzero=float(half_levels), qmin=0, qmax=2 * half_levels - 1)
    return grid, {"d": d}


def _fit_min_max(w: Tensor, name: str, levels: int) -> tuple[Grid, dict[str, Tensor]]:
    """Q4_1 (levels 16) / Q5_1 (32): ``d = (max - min) / (levels - 1)``, ``m = min``, gguf-py's
    ``trunc((w - min) / d + 0.5)``."""
    rows, n = _check(w, 32, name)
    x = w.float().reshape(rows, n, 32)
    low, high = x.amin(-1), x.amax(-1)
    d = (high - low) / (levels - 1)
    grid = Grid(sub=_spread(low, 32), inv=_spread(_inverse(d), 32), add=0.5, step=_spread(_fp16(d), 32),
                offset=_spread(_fp16(low), 32), qzero=0.0, qmin=0, qmax=levels - 1)
    return grid, {"d": d, "m": low}


def _nibble_pack(q: Tensor) -> Tensor:
    """(rows, n, 32) values 0..15 -> (rows, n, 16) bytes: elements 0-15 low nibbles, 16-31 high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _pack_q4_0(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    qs = _nibble_pack(q.reshape(rows, -1, 32))
    return torch.cat([_bytes_of_half(p["d"].unsqueeze(-1)), qs], dim=-1).reshape(rows, -1)


def _pack_q4_1(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    qs = _nibble_pack(q.reshape(rows, -1, 32))
    return torch.cat([_bytes_of_half(p["d"].unsqueeze(-1)), _bytes_of_half(p["m"].unsqueeze(-1)), qs],
                     dim=-1).reshape(rows, -1)


def _q5_bits(q: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, n, 32) values 0..31 -> (qh: 4 bytes, the fifth bits as a little-endian uint32; qs)."""
    q = q.to(torch.uint8)
    high = ((q >> 4) & 1).to(torch.int64) << torch.arange(32)
    qh = high.sum(-1, keepdim=True).to(torch.int32)  # bit 31 wraps to the sign: the same 4 bytes
    return qh.view(torch.uint8), _nibble_pack(q & 0xF)


def _pack_q5_0(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    qh, qs = _q5_bits(q.reshape(rows, -1, 32))
    return torch.cat([_bytes_of_half(p["d"].unsqueeze(-1)), qh, qs], dim=-1).reshape(rows, -1)


def _pack_q5_1(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    qh, qs = _q5_bits(q.reshape(rows, -1, 32))
    return torch.cat([_bytes_of_half(p["d"].unsqueeze(-1)), _bytes_of_half(p["m"].unsqueeze(-1)), qh, qs],
                     dim=-1).reshape(rows, -1)


# --- Q4_K ----------------------------------------------------------------------------------------

def _fit_q4_k(w: Tensor) -> tuple[Grid, dict[str, Tensor]]:
    rows, n = _check(w, 256, "Q4_K")
    x = w.float().reshape(rows, n, 8, 32)
    low = x.amin(-1).clamp(max=0)  # llama.cpp keeps the sub-block's minimum at or below 0
    scale = (x.amax(-1) - low) / 15
    neg_min = -low
    max_scale, max_min = scale.amax(-1, keepdim=True), neg_min.amax(-1, keepdim=True)
    ls = (scale * _inverse(max_scale / 63)).round().clamp(0, 63)
    lm = (neg_min * _inverse(max_min / 63)).round().clamp(0, 63)
    d, dmin = max_scale / 63, max_min / 63
    step = _fp16(d) * ls  # (rows, n, 8)
    offset = -_fp16(dmin) * lm
    grid = Grid(sub=_spread(offset, 32), inv=_spread(_inverse(step), 32), add=0.5, step=_spread(step, 32),
                offset=_spread(offset, 32), qzero=0.0, qmin=0, qmax=15)
    return grid, {"d": d.squeeze(-1), "dmin": dmin.squeeze(-1), "ls": ls, "lm": lm}


def _pack_q4_k(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    ls, lm = p["ls"].to(torch.uint8), p["lm"].to(torch.uint8)  # (rows, n, 8)
    scales = torch.cat([ls[..., :4] | ((ls[..., 4:] >> 4) << 6),
                        lm[..., :4] | ((lm[..., 4:] >> 4) << 6),
                        (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)], dim=-1)
    L = q.to(torch.uint8).reshape(rows, -1, 4, 2, 32)  # 64 weights per 32 bytes: low nibbles, then high
    qs = (L[..., 0, :] | (L[..., 1, :] << 4)).reshape(rows, -1, 128)
    head = torch.cat([_bytes_of_half(p["d"].unsqueeze(-1)), _bytes_of_half(p["dmin"].unsqueeze(-1))], dim=-1)
    return torch.cat([head, scales, qs], dim=-1).reshape(rows, -1)


# --- Q3_K ----------------------------------------------------------------------------------------

def _fit_q3_k(w: Tensor) -> tuple[Grid, dict[str, Tensor]]:
    rows, n = _check(w, 256, "Q3_K")
    x = w.float().reshape(rows, n, 16, 16)
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = extreme / -4  # the largest-magnitude weight on q - 4 = -4
    top = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))  # the signed largest scale -> -32
    iscale = _inverse(top) * -32
    ls = (scale * iscale).round().clamp(-32, 31)
    d = _inverse(iscale)
    step = _fp16(d) * ls
    zero = torch.zeros(rows, n * 256)
    grid = Grid(sub=zero, inv=_spread(_inverse(step), 16), add=4.5, step=_spread(step, 16), offset=zero,
                qzero=4.0, qmin=0, qmax=7)
    return grid, {"d": d.squeeze(-1), "ls": ls + 32}


def _pack_q3_k(q: Tensor, p: dict[str, Tensor]) -> Tensor:
    rows = q.shape[0]
    L = q.to(torch.uint8).reshape(rows, -1, 256)
    n = L.shape[1]
    shifts = torch.arange(8, dtype=torch.uint8)
    # hmask[m] bit b is the high bit of weight 32 b + m.
    high = (L > 3).to(torch.uint8).reshape(rows, n, 8, 32)
    hmask = (high << shifts.view(8, 1)).sum(2, dtype=torch.uint8)
    low = (L & 3).reshape(rows, n, 2, 4, 32)  # byte l of each 32-byte half: weights l, l+32, l+64, l+96
    qs = (low << (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)).sum(3, dtype=torch.uint8).reshape(rows, n, 64)
    Ls = p["ls"].to(torch.uint8)  # (rows, n, 16), 0..63
    lo = Ls & 0xF
    first = lo[..., :8] | (lo[..., 8:] << 4)
    hi = (Ls >> 4).reshape(rows, n, 4, 4)  # [j // 4, j % 4]
    last = (hi << (2 * torch.arange(4, dtype=torch.uint8)).view(4, 1)).sum(2, dtype=torch.uint8)
    return torch.cat([hmask, qs, first, last, _bytes_of_half(p["d"].unsqueeze(-1))], dim=-1).reshape(rows, -1)


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q8_0", 32, _fit_q8_0, _pack_q8_0),
    BlockFormat("Q4_0", 32, lambda w: _fit_symmetric(w, "Q4_0", 8), _pack_q4_0),
    BlockFormat("Q4_1", 32, lambda w: _fit_min_max(w, "Q4_1", 16), _pack_q4_1),
    BlockFormat("Q5_0", 32, lambda w: _fit_symmetric(w, "Q5_0", 16), _pack_q5_0),
    BlockFormat("Q5_1", 32, lambda w: _fit_min_max(w, "Q5_1", 32), _pack_q5_1),
    BlockFormat("Q4_K", 256, _fit_q4_k, _pack_q4_k),
    BlockFormat("Q3_K", 256, _fit_q3_k, _pack_q3_k),
)}


# --- GPTQ's own format (AutoGPTQ / transformers): b bits, groups of G inputs, fp16 scales ----------

def gptq_format(bits: int, group_size: int, sym: bool = False) -> BlockFormat:
    """The grid of GPTQ checkpoints (:mod:`llamalab.quant.gptq_format`): per group of ``group_size``
    inputs a scale and an integer zero point, ``w = scale * (q - zero)``, q in 0..2^bits-1, as
    the GPTQ code's ``Quantizer.find_params``: the range is the group's min-max widened to hold 0
    (``sym``: symmetric about 0, zero = 2^(bits-1)); scales kept in fp16, as stored. ``pack``
    returns {"q", "scales", "zeros"} (not bytes) for :func:`~llamalab.quant.gptq_format.write_gptq`.
    The zero point is at least 1: AutoGPTQ's v1 format stores zero - 1 and cannot hold -1."""
    maxq = 2 ** bits - 1

    def fit(w: Tensor) -> tuple[Grid, dict[str, Tensor]]:
        rows, n = _check(w, group_size, f"GPTQ with --group-size {group_size}:")
        x = w.float().reshape(rows, n, group_size)
        xmin, xmax = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
        scale = _fp16((xmax - xmin) / maxq)
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(1, maxq)
        zeros = torch.zeros(rows, n * group_size)
        grid = Grid(sub=zeros, inv=_spread(1 / scale, group_size), add=_spread(zero + 0.5, group_size),
                    step=_spread(scale, group_size), offset=zeros, qzero=_spread(zero, group_size), qmin=0, qmax=maxq)
        return grid, {"scales": scale, "zeros": zero}

    def pack(q: Tensor, p: dict[str, Tensor]) -> Any:
        return {"q": q.to(torch.int64), "scales": p["scales"], "zeros": p["zeros"].to(torch.int64)}

    return BlockFormat(f"GPTQ-{bits}bit-g{group_size}", group_size, fit, pack)


# Where a matrix's rows are not whole super-blocks of 256 (SmolLM2's 576-wide inputs), llama.cpp's
# quantizer falls back to a 32-block type: Q5_0 for Q4_K, as it does; Q4_0 for Q3_K (llama.cpp takes
# IQ4_NL, which llamalab does not write).
FALLBACK = {"Q4_K": "Q5_0", "Q3_K": "Q4_0"}


def format_for(name: str, in_features: int) -> BlockFormat:
    """The format a matrix of ``in_features`` columns gets when ``name`` is asked: ``name``, or its
    :data:`FALLBACK` where the rows are not whole blocks of it."""
    fmt = block_format(name)
    if in_features % fmt.group and fmt.name in FALLBACK:
        fmt = FORMATS[FALLBACK[fmt.name]]
    if in_features % fmt.group:
        raise ValueError(f"{in_features}-wide rows are not whole {fmt.name} blocks of {fmt.group}")
    return fmt


def block_format(name: str) -> BlockFormat:
    """The :class:`BlockFormat` of GGUF type ``name`` (ValueError naming the writable ones otherwise)."""
    key = name.upper()
    if key not in FORMATS:
        raise ValueError(f"cannot quantize into {name!r}; llamalab writes {', '.join(f.lower() for f in FORMATS)}")
    return FORMATS[key]


__all__ = ["FALLBACK", "FORMATS", "BlockFormat", "Grid", "block_format", "format_for", "gptq_format"]
