"""The AVX512-BF16 matrix-vector kernel (``llamalab.generate.gemv``) against fp64 arithmetic.

The reference is the product of the same bf16 values computed in fp64 and rounded once to
bf16: the kernel (exact bf16 products, fp32 sums, one rounding) must give that value, or one
bf16 step off where the fp32 sum lands next to a rounding boundary. Shapes cover the padding
paths: outputs not a multiple of the 16-row block, an odd number of inputs, several rows of x.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from llamalab.generate import gemv


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return platform.machine() == "x86_64" and all(f in flags for f in ("avx512_bf16", "avx512bw", "avx512vl"))


# On a CPU that has the instructions the kernel must build (a skipped test would hide a broken
# build): only elsewhere is it skipped.
needs_kernel = pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the CPU lacks AVX512-BF16")


@needs_kernel
def test_kernel_builds_where_the_cpu_has_the_instructions() -> None:
    assert gemv.bf16_gemv_available(), gemv.unavailable_reason()


def _next_bf16_step(y: torch.Tensor) -> torch.Tensor:
    """The gap between ``y`` (bf16) and its neighbour away from zero, in fp64."""
    bits = y.view(torch.int16).to(torch.int32) + 1
    return (bits.to(torch.int16).view(torch.bfloat16).double() - y.double()).abs()


@needs_kernel
@pytest.mark.parametrize("n,k,m", [(960, 576, 1), (576, 1536, 1), (37, 51, 1), (37, 51, 3), (100, 64, 7),
                                   (33, 2, 1), (16, 8, 4), (5, 3, 2), (300, 130, 16)])
@pytest.mark.parametrize("residual", [False, True])
def test_equals_fp64_product_rounded_once(n: int, k: int, m: int, residual: bool) -> None:
    torch.manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(m, k).bfloat16()
    other = torch.randn(m, n).bfloat16() if residual else None
    y = gemv.gemv_bf16(x, gemv.pack_bf16(w), n, other)
    exact = x.double() @ w.double().T + (other.double() if residual else 0)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    rounded = exact.to(torch.bfloat16)
    off = y != rounded
    # Where it differs, by one step of bf16 at most (an fp32 sum next to a rounding boundary).
    assert torch.all((y.double() - rounded.double()).abs()[off] <= _next_bf16_step(rounded)[off])
    assert off.float().mean() < 0.01


@needs_kernel
def test_leading_dimensions_and_non_contiguous_input() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 40).bfloat16()
    x = torch.randn(2, 1, 80).bfloat16()[..., ::2]  # (2, 1, 40), strided
    y = gemv.gemv_bf16(x, gemv.pack_bf16(w), 48)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y.float(), (x.double() @ w.double().T).float(), atol=0.05, rtol=0.01)


@needs_kernel
def test_bad_input_is_a_clear_error() -> None:
    w = torch.randn(32, 16).bfloat16()
    packed = gemv.pack_bf16(w)
    with pytest.raises(RuntimeError, match="16 features and 40 outputs do not match"):
        gemv.gemv_bf16(torch.randn(1, 16).bfloat16(), packed, 40)
    with pytest.raises(RuntimeError, match="do not match the packed weight"):
        gemv.gemv_bf16(torch.randn(1, 18).bfloat16(), packed, 32)
    with pytest.raises(RuntimeError, match="expected bf16 CPU input"):
        gemv.gemv_bf16(torch.randn(1, 16), packed, 32)
    with pytest.raises(RuntimeError, match="expected a 2-D bf16 CPU weight"):
        gemv.pack_bf16(torch.randn(32, 16))
    with pytest.raises(RuntimeError, match="not one that gemv_bf16_pack returned"):
        gemv.gemv_bf16(torch.randn(1, 16).bfloat16(), w, 32)


@needs_kernel
def test_compiled_graph_calls_the_kernel() -> None:
    """torch.compile traces the op through its shape rule and calls it: same values as eager."""
    torch.manual_seed(2)
    w = torch.randn(64, 32).bfloat16()
    packed = gemv.pack_bf16(w)

    def f(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(gemv.gemv_bf16(x, packed, 64, h)) * 2

    x, h = torch.randn(1, 32).bfloat16(), torch.randn(1, 64).bfloat16()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, h), f(x, h))


@needs_kernel
def test_float_out_keeps_the_fp32_sums() -> None:
    """``float_out``: fp32 results within fp32 summation error of the fp64 product (no bf16 rounding)."""
    torch.manual_seed(3)
    w = torch.randn(200, 576).bfloat16()
    x = torch.randn(2, 576).bfloat16()
    y = gemv.gemv_bf16(x, gemv.pack_bf16(w), 200, float_out=True)
    assert y.dtype == torch.float32
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T  # bound of the sum's rounding: ~K eps sum|x w|
    assert torch.all((y.double() - exact).abs() <= 576 * 2 ** -24 * scale)
    bf16_err = (exact.to(torch.bfloat16).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() < bf16_err / 10
