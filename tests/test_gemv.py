"""llamalab's matrix-vector kernel (``llamalab.generate.gemv``) against fp64 arithmetic, on
every instruction-set path this CPU has (AVX2, AVX-512, AVX512-BF16), each forced in turn.

bf16: the reference is the product of the same bf16 values computed in fp64 and rounded once
to bf16; the kernel (exact bf16 products, fp32 sums, one rounding) must give that value, or
one bf16 step off where the fp32 sum lands next to a rounding boundary. fp32: within the
standard bound of an fp32 sum of k terms (k * 2^-24 * sum |x w|). Shapes cover the edge paths:
rows not a multiple of the 8 walked together, columns not a multiple of a vector step (8, 16
or 32 columns by path), 1-4 rows of x, a fused residual.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llamalab.generate import gemv


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


FLAGS = _cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
# The paths the kernel must offer here, read from /proc/cpuinfo (not from the kernel itself).
EXPECTED_ISAS = [name for name, needs in (("avx2", {"avx2", "fma"}), ("avx512", {"avx512f", "avx512bw", "avx512vl"}),
                                          ("avx512bf16", {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}))
                 if needs <= FLAGS]
ALL_ISAS = ["avx2", "avx512", "avx512bf16"]

# On a CPU that has the instructions the kernel must build (a skipped test would hide a broken
# build): only elsewhere is it skipped.
needs_kernel = pytest.mark.skipif(not EXPECTED_ISAS, reason="the CPU has neither AVX2+FMA nor AVX-512")


@needs_kernel
def test_kernel_builds_where_the_cpu_has_the_instructions() -> None:
    assert gemv.gemv_available(torch.bfloat16), gemv.unavailable_reason(torch.bfloat16)
    assert gemv.gemv_available(torch.float32), gemv.unavailable_reason(torch.float32)
    assert not gemv.gemv_available(torch.float16)
    assert gemv.available_isas() == EXPECTED_ISAS
    if os.environ.get("LLAMALAB_GEMV_ISA", "auto") == "auto":
        assert gemv.isa() == EXPECTED_ISAS[-1]  # the best path by default


@pytest.fixture(params=ALL_ISAS)
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each path in turn, forced; a path this CPU lacks is skipped (the others still run)."""
    if request.param not in EXPECTED_ISAS:
        pytest.skip(f"the CPU lacks the instructions of the {request.param} path")
    with gemv.use_isa(request.param):
        assert gemv.isa() == request.param
        yield request.param


@needs_kernel
def test_a_path_the_cpu_lacks_is_a_clear_error() -> None:
    missing = [name for name in ALL_ISAS if name not in EXPECTED_ISAS]
    with pytest.raises(RuntimeError, match="unknown path 'avx9'"):
        with gemv.use_isa("avx9"):
            pass
    if missing:
        with pytest.raises(RuntimeError, match=f"the {missing[0]} path needs instructions this CPU lacks"):
            with gemv.use_isa(missing[0]):
                pass
    assert gemv.isa() == EXPECTED_ISAS[-1] or os.environ.get("LLAMALAB_GEMV_ISA")  # restored


@needs_kernel
@pytest.mark.parametrize("forced", ["avx2", "avx512bf16", "bogus"])
def test_environment_variable_forces_the_path(forced: str) -> None:
    """``LLAMALAB_GEMV_ISA`` picks the path in a new process; one the CPU lacks leaves the kernel
    unavailable with the reason (callers then take oneDNN's kernels), never a crash."""
    code = ("import torch; from llamalab.generate import gemv; "
            "print(gemv.isa()); print(gemv.gemv_available(torch.float32))")
    env = {**os.environ, "LLAMALAB_GEMV_ISA": forced}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    isa, available = out.stdout.splitlines()
    if forced in EXPECTED_ISAS:
        assert (isa, available) == (forced, "True")
    else:
        assert available == "False" and isa.startswith(f"none: LLAMALAB_GEMV_ISA={forced}: gemv: ")


def _next_bf16_step(y: torch.Tensor) -> torch.Tensor:
    """The gap between ``y`` (bf16) and its neighbour away from zero, in fp64."""
    bits = y.view(torch.int16).to(torch.int32) + 1
    return (bits.to(torch.int16).view(torch.bfloat16).double() - y.double()).abs()


SHAPES = [(24, 48, 2), (9, 33, 1), (8, 17, 3), (960, 576, 1), (576, 1536, 1), (37, 51, 1), (37, 51, 3), (100, 64, 4), (33, 2, 1), (16, 8, 4),
          (5, 3, 2), (300, 130, 4), (7, 1, 1)]


@needs_kernel
@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_bf16_equals_fp64_product_rounded_once(path: str, n: int, k: int, m: int, residual: bool) -> None:
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
def test_fp32_within_the_bound_of_an_fp32_sum(path: str, n: int, k: int, m: int, residual: bool) -> None:
    torch.manual_seed(n * 1000 + k + m + 1)
    w, x = torch.randn(n, k), torch.randn(m, k)
    other = torch.randn(m, n) if residual else None
    y = gemv.gemv(x, w, other)
    exact = x.double() @ w.double().T + (other.double() if residual else 0)
    assert y.shape == (m, n) and y.dtype == torch.float32
    bound = _fp32_sum_bound(x, w) + (exact.abs() * 2.0 ** -24 if residual else 0)
    assert torch.all((y.double() - exact).abs() <= bound)


@needs_kernel
def test_bf16_float_out_keeps_the_fp32_sums(path: str) -> None:
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
def test_leading_dimensions_and_non_contiguous_input(path: str) -> None:
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


def _rms_normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp64 (the LLaMA formula: x / sqrt(mean(x^2) + eps) * weight)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,m", [(96, 576, 1), (37, 51, 3), (40, 48, 4)])
@pytest.mark.parametrize("fused", ["norm", "swiglu"])
def test_fused_norm_and_swiglu_against_fp64(path: str, dtype: torch.dtype, n: int, k: int, m: int,
                                            fused: str) -> None:
    """``norm=``: the product of RMSNorm(x) * weight; ``swiglu=``: of silu(gate) * up (x's two
    halves). Against the same formula in fp64: within the bound of the fp32 arithmetic, plus,
    in bf16, the rounding of the prepared input (the AVX512-BF16 path rounds it to bf16) and of
    the output. Unnormalised input is ~sqrt(mean(x^2)) = 3 times off, far outside the bound."""
    torch.manual_seed(n + k + m)
    w = torch.randn(n, k).to(dtype)
    if fused == "norm":
        x = (3 * torch.randn(m, k)).to(dtype)
        nw = (1 + 0.1 * torch.randn(k)).to(dtype)
        y = gemv.gemv(x, w, norm=nw, eps=1e-5)
        ref_x = _rms_normed(x, nw, 1e-5)
    else:
        x = torch.randn(m, 2 * k).to(dtype)
        y = gemv.gemv(x, w, swiglu=True)
        gate, up = x.double().chunk(2, dim=-1)
        ref_x = torch.nn.functional.silu(gate) * up
    exact = ref_x @ w.double().T
    scale = ref_x.abs() @ w.double().abs().T
    if dtype == torch.float32:
        bound = 4 * (k + 1) * 2.0 ** -24 * scale
    else:
        bound = 2.0 ** -9 * scale + 2.0 ** -8 * exact.abs() + 1e-6
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.all((y.double() - exact).abs() <= bound)


@needs_kernel
def test_fused_input_errors() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="swiglu: twice the columns"):
        gemv.gemv(torch.randn(1, 16), w, swiglu=True)
    with pytest.raises(RuntimeError, match="`norm` must be a CPU vector of 16 weights"):
        gemv.gemv(torch.randn(1, 16), w, norm=torch.ones(15))
