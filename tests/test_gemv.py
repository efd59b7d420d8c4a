"""llamalab's matrix-vector kernel (``llamalab.generate.gemv``) against fp64 arithmetic.

bf16: the reference is the product of the same bf16 values computed in fp64 and rounded once
to bf16; the kernel (exact bf16 products, fp32 sums, one rounding) must give that value, or
one bf16 step off where the fp32 sum lands next to a rounding boundary. fp32: within the
standard bound of an fp32 sum of k terms (k * 2^-24 * sum |x w|). Shapes cover the edge paths:
rows not a multiple of the 8 walked together, columns not a multiple of a 64-byte step, 1-4
rows of x, a fused residual.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from llamalab.generate import gemv


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


AVX512 = platform.machine() == "x86_64" and all(f in _cpu_flags() for f in ("avx512f", "avx512bw", "avx512vl"))
AVX512_BF16 = AVX512 and "avx512_bf16" in _cpu_flags()

# On a CPU that has the instructions the kernel must build (a skipped test would hide a broken
# build): only elsewhere is it skipped.
needs_kernel = pytest.mark.skipif(not AVX512_BF16, reason="the CPU lacks AVX512-BF16")


@needs_kernel
def test_kernel_builds_where_the_cpu_has_the_instructions() -> None:
    assert gemv.gemv_available(torch.bfloat16), gemv.unavailable_reason(torch.bfloat16)
    assert gemv.gemv_available(torch.float32), gemv.unavailable_reason(torch.float32)
    assert not gemv.gemv_available(torch.float16)


def _next_bf16_step(y: torch.Tensor) -> torch.Tensor:
    """The gap between ``y`` (bf16) and its neighbour away from zero, in fp64."""
    bits = y.view(torch.int16).to(torch.int32) + 1
    return (bits.to(torch.int16).view(torch.bfloat16).double() - y.double()).abs()


SHAPES = [(960, 576, 1), (576, 1536, 1), (37, 51, 1), (37, 51, 3), (100, 64, 4), (33, 2, 1), (16, 8, 4),
          (5, 3, 2), (300, 130, 4), (7, 1, 1)]


@needs_kernel
@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_equals_fp64_product_rounded_once(n: int, k: int, m: int, residual: bool) -> None:
    torch.manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(m, k).bfloat16()
    other = torch.randn(m, n).bfloat16() if residual else None
    y = gemv.gemv(x, w, other)
    exact = x.double() @ w.double().T + (other.double() if residual else 0)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    rounded = exact.to(torch.bfloat16)
    off = y != rounded
    # Where it differs, by one step of bf16 at most (an fp32 sum next to a rounding boundary).
    assert torch.all((y.double() - rounded.double()).abs()[off] <= _next_bf16_step(rounded)[off])
    assert off.float().mean() < 0.01


def _fp32_sum_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The standard bound on an fp32 sum of k products: k * 2^-24 * sum |x w| (plus rounding
    of the products themselves, within the same factor)."""
    return (x.shape[-1] + 1) * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)


@needs_kernel
@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_within_the_bound_of_an_fp32_sum(n: int, k: int, m: int, residual: bool) -> None:
    torch.manual_seed(n * 1000 + k + m + 1)
    w, x = torch.randn(n, k), torch.randn(m, k)
    other = torch.randn(m, n) if residual else None
    y = gemv.gemv(x, w, other)
    exact = x.double() @ w.double().T + (other.double() if residual else 0)
    assert y.shape == (m, n) and y.dtype == torch.float32
    bound = _fp32_sum_bound(x, w) + (exact.abs() * 2.0 ** -24 if residual else 0)
    assert torch.all((y.double() - exact).abs() <= bound)


@needs_kernel
def test_bf16_float_out_keeps_the_fp32_sums() -> None:
    """``float_out``: fp32 results within fp32 summation error of the fp64 product (no bf16 rounding)."""
    torch.manual_seed(3)
    w = torch.randn(200, 576).bfloat16()
    x = torch.randn(2, 576).bfloat16()
    y = gemv.gemv(x, w, float_out=True)
    assert y.dtype == torch.float32
    exact = x.double() @ w.double().T
    assert torch.all((y.double() - exact).abs() <= _fp32_sum_bound(x, w))
    bf16_err = (exact.to(torch.bfloat16).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() < bf16_err / 10


@needs_kernel
def test_leading_dimensions_and_non_contiguous_input() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 40).bfloat16()
    x = torch.randn(2, 1, 80).bfloat16()[..., ::2]  # (2, 1, 40), strided
    y = gemv.gemv(x, w)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y.float(), (x.double() @ w.double().T).float(), atol=0.05, rtol=0.01)


@needs_kernel
def test_bad_input_is_a_clear_error() -> None:
    w = torch.randn(32, 16).bfloat16()
    with pytest.raises(RuntimeError, match="input of 18 features for a weight of 16 columns"):
        gemv.gemv(torch.randn(1, 18).bfloat16(), w)
    with pytest.raises(RuntimeError, match="expected BFloat16 CPU input, got Float"):
        gemv.gemv(torch.randn(1, 16), w)
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16 or fp32 CPU weight"):
        gemv.gemv(torch.randn(1, 32).bfloat16(), w.t())
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16 or fp32 CPU weight"):
        gemv.gemv(torch.randn(1, 16).half(), w.half())
    with pytest.raises(RuntimeError, match="5 rows of input; the kernel takes up to 4"):
        gemv.gemv(torch.randn(5, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="`other` must be BFloat16 with the output's 32 elements"):
        gemv.gemv(torch.randn(1, 16).bfloat16(), w, torch.randn(1, 31).bfloat16())


@needs_kernel
def test_compiled_graph_calls_the_kernel() -> None:
    """torch.compile traces the op through its shape rule and calls it: same values as eager."""
    assert gemv.gemv_available(torch.bfloat16)  # loads it: a build cannot happen inside a trace
    torch.manual_seed(2)
    w = torch.randn(64, 32).bfloat16()

    def f(x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Inductor would compute elementwise work around the op in fp32 (no bf16 rounding in
        # between), so the outputs are the op's own: they must then be equal.
        return gemv.gemv(x * 2, w, h), gemv.gemv(x, w, float_out=True)

    x, h = torch.randn(1, 32).bfloat16(), torch.randn(1, 64).bfloat16()
    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(x, h), f(x, h)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
