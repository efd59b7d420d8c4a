"""The decode step's fused attention (``llamalab.generate.gemv.decode_attention``,
``csrc/attention.cpp``) against the same step computed from the formula in fp64.

The reference: RoPE as a complex multiply of each (even, odd) pair by ``cos + i sin``, the
rotated query and key rounded to the cache's dtype (what the eager step stores and reads),
softmax(q K^T / sqrt(d)) V over slots ``[0, pos]`` with query head ``h`` reading key/value head
``h // (n_heads / n_kv_heads)``, in fp64, rounded once to the model's dtype. Slots after ``pos``
hold garbage the op must not read; slots before it hold earlier steps' keys and values.
Shapes cover the vector path (head_dim a multiple of 8: 16, 64, 96 = a 64-column block and a
32-column one; slot counts not a multiple of 4 or 8) and the scalar one (head_dim 12).
"""

from __future__ import annotations

import pytest
import torch

from llamalab.generate import gemv

needs_kernel = pytest.mark.skipif(not gemv.gemv_available(torch.float32), reason="the decode kernel cannot be built here")


def _rope(pos: int, d: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos * freqs
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float()  # (d/2, 2)


def _reference(qkv: torch.Tensor, rope: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
               nh: int, nkv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, key cache, value cache) after the step, from the formula."""
    dtype, d = k_cache.dtype, k_cache.shape[-1]
    bsz = qkv.shape[0]
    x = qkv.reshape(bsz, nh + 2 * nkv, d).double()
    qk = x[:, : nh + nkv].reshape(bsz, nh + nkv, d // 2, 2)
    z = torch.view_as_complex(qk.contiguous()) * torch.view_as_complex(rope.double().contiguous())
    qk = torch.view_as_real(z).flatten(-2).to(dtype)  # the rotation rounded to the cache's dtype
    q, k, v = qk[:, :nh].double(), qk[:, nh:], x[:, nh + nkv:].to(dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    kc[:bsz, :, pos] = k
    vc[:bsz, :, pos] = v
    keys = kc[:bsz, :, : pos + 1].double().repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, d)
    values = vc[:bsz, :, : pos + 1].double().repeat_interleave(nh // nkv, dim=1)
    scores = torch.einsum("bhd,bhtd->bht", q, keys) / d ** 0.5
    out = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values)
    return out.reshape(bsz, 1, nh * d).to(dtype), kc, vc


def _paths() -> list[str]:
    """The kernel's paths on this CPU (the attention follows gemv's: avx2, and AVX-512 where the CPU
    has it), each test case run on every one."""
    return gemv.available_isas() or ["auto"]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Head sizes of 16 lanes (the AVX-512 kernel: 16, 48, 64, 96) and not (12: AVX2's 8, 8 + 4 scalar),
# slot counts below, at and past 16 (its blocks of 16 scores) and groups of 1-6 query heads (its
# value sums: 4 heads at a time).
@pytest.mark.parametrize("nh,nkv,d,bsz,pos", [(9, 3, 64, 1, 0), (9, 3, 64, 1, 200), (4, 4, 16, 2, 7),
                                              (8, 2, 12, 3, 30), (6, 1, 64, 4, 63),
                                              (4, 2, 96, 1, 37), (12, 2, 48, 2, 15), (10, 2, 16, 1, 16)])
@pytest.mark.parametrize("path", _paths())
def test_matches_the_formula_in_fp64(dtype: torch.dtype, nh: int, nkv: int, d: int, bsz: int, pos: int,
                                     path: str) -> None:
    with gemv.use_isa(path):
        _check_formula(dtype, nh, nkv, d, bsz, pos)


def _check_formula(dtype: torch.dtype, nh: int, nkv: int, d: int, bsz: int, pos: int) -> None:
    g = torch.Generator().manual_seed(pos * 31 + nh)
    slots, rows = 64 if pos < 64 else 256, 4
    qkv = torch.randn(bsz, 1, (nh + 2 * nkv) * d, generator=g).to(dtype)
    k_cache = torch.randn(rows, nkv, slots, d, generator=g).to(dtype)
    v_cache = torch.randn(rows, nkv, slots, d, generator=g).to(dtype)
    rope = _rope(pos, d)
    want, want_k, want_v = _reference(qkv, rope, k_cache, v_cache, pos, nh, nkv)
    got = gemv.decode_attention(qkv, rope, k_cache, v_cache, pos, nh, nkv)
    assert got.shape == (bsz, 1, nh * d) and got.dtype == dtype
    # The cache write: the rotated key rounded as the reference rounds it, the value as given; at
    # bf16 a rotation that lands next to a rounding boundary may round the other way (fp32 vs fp64).
    kt = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    torch.testing.assert_close(k_cache, want_k, **(dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else kt))
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
    # fp32: an fp32 softmax-weighted sum; bf16: one rounding (plus the key's, as above).
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.double(), want.double(), **tol)


@needs_kernel
def test_reads_no_slot_after_the_position() -> None:
    nh, nkv, d, pos = 4, 2, 32, 5
    qkv = torch.randn(1, (nh + 2 * nkv) * d)
    k_cache, v_cache = torch.randn(1, nkv, 16, d), torch.randn(1, nkv, 16, d)
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[:, :, pos + 1:] = float("nan")
    v2[:, :, pos + 1:] = float("inf")
    rope = _rope(pos, d)
    a = gemv.decode_attention(qkv, rope, k_cache, v_cache, pos, nh, nkv)
    b = gemv.decode_attention(qkv, rope, k2, v2, pos, nh, nkv)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_kernel
def test_bad_input_is_a_clear_error() -> None:
    nh, nkv, d = 4, 2, 8
    qkv = torch.randn(1, (nh + 2 * nkv) * d)
    kc, vc = torch.zeros(1, nkv, 8, d), torch.zeros(1, nkv, 8, d)
    rope = _rope(0, d)
    with pytest.raises(RuntimeError, match="outside the cache's 8 slots"):
        gemv.decode_attention(qkv, rope, kc, vc, 8, nh, nkv)
    with pytest.raises(RuntimeError, match="do not split into groups"):
        gemv.decode_attention(qkv, rope, kc, vc, 0, 5, nkv)
    with pytest.raises(RuntimeError, match="one dtype"):
        gemv.decode_attention(qkv, rope, kc.half(), vc, 0, nh, nkv)
    with pytest.raises(RuntimeError, match="an fp32 or bf16 qkv"):
        gemv.decode_attention(qkv.half(), rope, kc, vc, 0, nh, nkv)
    with pytest.raises(RuntimeError, match="one token's q, k, v per row"):
        gemv.decode_attention(qkv[:, :-1], rope, kc, vc, 0, nh, nkv)
    with pytest.raises(RuntimeError, match="rotary table"):
        gemv.decode_attention(qkv, rope[:-1], kc, vc, 0, nh, nkv)
    with pytest.raises(RuntimeError, match="2 rows for a cache of 1"):
        gemv.decode_attention(torch.cat([qkv, qkv]), rope, kc, vc, 0, nh, nkv)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_scores(dtype: torch.dtype) -> None:
    """Scores hundreds apart: the softmax's exponentials span their whole range, most underflow."""
    nh, nkv, d, pos = 4, 2, 64, 100
    g = torch.Generator().manual_seed(5)
    qkv = (torch.randn(1, 1, (nh + 2 * nkv) * d, generator=g) * 8).to(dtype)
    k_cache = (torch.randn(1, nkv, 128, d, generator=g) * 8).to(dtype)
    v_cache = torch.randn(1, nkv, 128, d, generator=g).to(dtype)
    rope = _rope(pos, d)
    want, _, _ = _reference(qkv, rope, k_cache, v_cache, pos, nh, nkv)
    got = gemv.decode_attention(qkv, rope, k_cache, v_cache, pos, nh, nkv)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.double(), want.double(), **tol)


# ---------------------------------------------------------------- each row at its own position


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,d,positions", [(9, 3, 64, [0, 17, 5, 63]), (8, 2, 12, [30, 2, 11]),
                                                (4, 4, 16, [7])])
@pytest.mark.parametrize("path", _paths())
def test_rows_at_their_own_positions_match_the_formula_row_by_row(dtype: torch.dtype, nh: int, nkv: int, d: int,
                                                                   positions: list[int], path: str) -> None:
    with gemv.use_isa(path):
        _check_rows(dtype, nh, nkv, d, positions)


def _check_rows(dtype: torch.dtype, nh: int, nkv: int, d: int, positions: list[int]) -> None:
    """decode_attention_rows: row b rotated by its own position's table, written at its own slot,
    attending over its own slots [0, pos_b]: each row equals the formula's one-row step at that
    position (rows after the batch untouched)."""
    g = torch.Generator().manual_seed(len(positions) * 7 + d)
    bsz, slots, rows = len(positions), 64, len(positions) + 1
    qkv = torch.randn(bsz, 1, (nh + 2 * nkv) * d, generator=g).to(dtype)
    k_cache = torch.randn(rows, nkv, slots, d, generator=g).to(dtype)
    v_cache = torch.randn(rows, nkv, slots, d, generator=g).to(dtype)
    k0, v0 = k_cache.clone(), v_cache.clone()
    rope = torch.stack([_rope(p, d) for p in positions])  # (B, d/2, 2)
    got = gemv.decode_attention_rows(qkv, rope, k_cache, v_cache, torch.tensor(positions), nh, nkv)
    assert got.shape == (bsz, 1, nh * d) and got.dtype == dtype
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    kt = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=2 ** -7)
    for b, pos in enumerate(positions):
        want, want_k, want_v = _reference(qkv[b:b + 1], rope[b], k0[b:b + 1], v0[b:b + 1], pos, nh, nkv)
        torch.testing.assert_close(got[b:b + 1].double(), want.double(), **tol)
        torch.testing.assert_close(k_cache[b:b + 1], want_k, **kt)
        torch.testing.assert_close(v_cache[b:b + 1], want_v, atol=0, rtol=0)
    assert torch.equal(k_cache[bsz:], k0[bsz:]) and torch.equal(v_cache[bsz:], v0[bsz:])


@needs_kernel
def test_rows_bad_input_is_a_clear_error() -> None:
    nh, nkv, d = 4, 2, 8
    qkv = torch.randn(2, (nh + 2 * nkv) * d)
    kc, vc = torch.zeros(2, nkv, 8, d), torch.zeros(2, nkv, 8, d)
    rope = torch.stack([_rope(0, d), _rope(3, d)])
    with pytest.raises(RuntimeError, match="row 1's position 8 outside the cache's 8 slots"):
        gemv.decode_attention_rows(qkv, rope, kc, vc, torch.tensor([0, 8]), nh, nkv)
    with pytest.raises(RuntimeError, match="one per row"):
        gemv.decode_attention_rows(qkv, rope, kc, vc, torch.tensor([0]), nh, nkv)
    with pytest.raises(RuntimeError, match="each row's rotary table"):
        gemv.decode_attention_rows(qkv, rope[:1], kc, vc, torch.tensor([0, 3]), nh, nkv)


# ---------------------------------------------------------------- a 16-bit cache of an fp32 (or bf16) model


def _written_and_attended(qkv: torch.Tensor, rope: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          pos: int, nh: int, nkv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rotated key, value) as the eager step stores them: rotated in fp64, rounded to the activations'
    dtype (``type_as``), then to the cache's; and the rotated query in the activations' dtype."""
    act, cache, d = qkv.dtype, k_cache.dtype, k_cache.shape[-1]
    bsz = qkv.shape[0]
    x = qkv.reshape(bsz, nh + 2 * nkv, d).double()
    qk = x[:, : nh + nkv].reshape(bsz, nh + nkv, d // 2, 2)
    z = torch.view_as_complex(qk.contiguous()) * torch.view_as_complex(rope.double().contiguous())
    qk = torch.view_as_real(z).flatten(-2).to(act)
    return qk[:, nh:].to(cache), x[:, nh + nkv:].to(act).to(cache), qk[:, :nh].double()


@needs_kernel
@pytest.mark.parametrize("act,cache", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                       (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("nh,nkv,d,positions", [(9, 3, 64, [0, 17, 5, 63]), (8, 2, 12, [30, 2, 11]),
                                                (12, 2, 48, [15, 16]), (4, 2, 96, [37])])
@pytest.mark.parametrize("path", _paths())
def test_a_16bit_cache_matches_the_formula(act: torch.dtype, cache: torch.dtype, nh: int, nkv: int, d: int,
                                           positions: list[int], path: str) -> None:
    """An f16 / bf16 cache under fp32 (or bf16) activations (``Transformer.kv_cache_dtype``): the new
    key and value stored rounded to the cache's dtype, the cached ones widened exactly, the output in
    the activations' dtype; both ops, every path this CPU has."""
    g = torch.Generator().manual_seed(len(positions) * 5 + d)
    bsz, slots = len(positions), 64
    qkv = torch.randn(bsz, 1, (nh + 2 * nkv) * d, generator=g).to(act)
    k0 = torch.randn(bsz + 1, nkv, slots, d, generator=g).to(cache)
    v0 = torch.randn(bsz + 1, nkv, slots, d, generator=g).to(cache)
    ulp = 2 ** -10 if cache == torch.float16 else 2 ** -7
    tol = dict(atol=2e-5, rtol=1e-4) if act == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with gemv.use_isa(path):
        for rows in (False, True):
            if rows:  # each row at its own position
                rope = torch.stack([_rope(p, d) for p in positions])
                kc, vc = k0.clone(), v0.clone()
                got = gemv.decode_attention_rows(qkv, rope, kc, vc, torch.tensor(positions), nh, nkv)
                cases = list(enumerate(positions))
            else:  # every row at the first position
                rope = _rope(positions[0], d)
                kc, vc = k0.clone(), v0.clone()
                got = gemv.decode_attention(qkv, rope, kc, vc, positions[0], nh, nkv)
                cases = [(b, positions[0]) for b in range(bsz)]
            assert got.dtype == act and kc.dtype == cache
            for b, pos in cases:
                key, value, q = _written_and_attended(qkv[b:b + 1], rope[b] if rows else rope, k0, v0, pos, nh, nkv)
                # the write: the value exactly, the key within one rounding of the cache's dtype (the
                # kernel rotates in fp32, the reference in fp64)
                torch.testing.assert_close(vc[b, :, pos], value[0], atol=0, rtol=0)
                torch.testing.assert_close(kc[b, :, pos].float(), key[0].float(), atol=1e-6, rtol=ulp)
                untouched = torch.ones(slots, dtype=torch.bool)
                untouched[pos] = False
                assert torch.equal(kc[b, :, untouched], k0[b, :, untouched])
                # the attention over the slots as stored, in fp64
                keys = kc[b, :, : pos + 1].double().repeat_interleave(nh // nkv, dim=0)
                values = vc[b, :, : pos + 1].double().repeat_interleave(nh // nkv, dim=0)
                scores = torch.einsum("hd,htd->ht", q[0], keys) / d ** 0.5
                want = torch.einsum("ht,htd->hd", scores.softmax(-1), values).reshape(nh * d)
                torch.testing.assert_close(got[b, 0].double(), want, **tol)
            assert torch.equal(kc[bsz:], k0[bsz:]) and torch.equal(vc[bsz:], v0[bsz:])


@needs_kernel
@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 16, 12])  # 64, 16: 8 values a vector step; 12: the scalar loop
def test_the_written_key_is_the_fp32_rotation_bit_for_bit(cache: torch.dtype, d: int) -> None:
    """An fp32 model's key as the op writes it: x0 c - x1 s and x1 c + x0 s with each product
    rounded to fp32 (no fused multiply-add), then rounded to the cache's dtype; the value as
    given, rounded. Exactly, so the vector path (head sizes of 8) and the scalar one store the
    same bits, and a row written batched equals one written alone."""
    nh, nkv, positions = 4, 2, [3, 40, 0]
    g = torch.Generator().manual_seed(d)
    bsz = len(positions)
    qkv = torch.randn(bsz, 1, (nh + 2 * nkv) * d, generator=g) * 3
    rope = torch.stack([_rope(p, d) for p in positions])
    k_cache, v_cache = torch.zeros(bsz, nkv, 64, d, dtype=cache), torch.zeros(bsz, nkv, 64, d, dtype=cache)
    gemv.decode_attention_rows(qkv, rope, k_cache, v_cache, torch.tensor(positions), nh, nkv)
    x = qkv.view(bsz, nh + 2 * nkv, d // 2, 2)
    x0, x1 = x[:, nh:nh + nkv, :, 0], x[:, nh:nh + nkv, :, 1]
    c, s = rope[:, None, :, 0], rope[:, None, :, 1]
    want_k = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2).to(cache)
    want_v = qkv.view(bsz, nh + 2 * nkv, d)[:, nh + nkv:].to(cache)
    for b, p in enumerate(positions):
        assert torch.equal(k_cache[b, :, p], want_k[b]) and torch.equal(v_cache[b, :, p], want_v[b])
    # One row alone at one position, through the other op: the same bits.
    k1, v1 = torch.zeros(1, nkv, 64, d, dtype=cache), torch.zeros(1, nkv, 64, d, dtype=cache)
    gemv.decode_attention(qkv[1:2], rope[1], k1, v1, positions[1], nh, nkv)
    assert torch.equal(k1[0, :, positions[1]], want_k[1]) and torch.equal(v1[0, :, positions[1]], want_v[1])
