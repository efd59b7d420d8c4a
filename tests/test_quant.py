"""llamalab.quant: GGUF blocks kept as stored, the quantized kernels, and models that run on them.

References: gguf-py (``gguf.quants.quantize`` makes the blocks, ``gguf.quants.dequantize`` reads
them back), float64 arithmetic on the dequantized weights and activations (the kernels must equal
it within their fp32 accumulation), transformers' GGUF loader (the dequantized model) and, when
llama-cpp-python is installed, llama.cpp's own greedy output on the real file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import hf_logits, make_hf_model, tokens_for, train_tokenizer, transformers_gguf, write_gguf  # noqa: E402

import llamalab  # noqa: E402
from llamalab.quant import QuantizedEmbedding, QuantizedLinear, kernels  # noqa: E402
from llamalab.quant.blocks import dequantize, dequantize_rows, row_bytes  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_1"]
needs_kernel = pytest.mark.skipif(not kernels.kernel_available(), reason=f"no quantized kernel: {kernels.unavailable_reason()}")


def _blocks(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """``w`` quantized by gguf-py (the independent quantizer), as (rows, row_bytes) uint8."""
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[type_name]))


def _expected_isas() -> list[str]:
    """The kernel paths this CPU should offer, from /proc/cpuinfo (not from the kernel itself)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    isas = ["avx2"] if {"avx2", "fma", "f16c"} <= set(flags) else []
    if isas and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags):
        isas.append("avx512vnni")
        if {"amx_tile", "amx_int8"} <= set(flags) and _os_grants_amx():
            isas.append("amx")
    return isas


def _os_grants_amx() -> bool:
    """Whether Linux lets this process use the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM for
    XTILEDATA, asked here through libc: a container may refuse it)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def _reference(x: torch.Tensor, blocks: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact float64 product of the quantized activations and weights, sum |x||w| bound).

    The activations as the kernel quantizes them (checked separately against the formula); for
    Q4_1 the offsets use llama.cpp's fp16 ``d * sum(q)`` (block_q8_1's ``s``), as the kernel does.
    """
    k = x.shape[1]
    q, d, s = torch.ops.llamalab_quant.quantize_activations(x)
    xq = (q.double().view(len(x), -1, 32) * d.double().unsqueeze(-1)).view(len(x), k)
    w = dequantize(blocks, type_name, k).double()
    exact = xq @ w.T
    if type_name in ("Q4_1", "Q5_1"):
        bb = 20 if type_name == "Q4_1" else 24
        mins = blocks.view(blocks.shape[0], -1, bb)[..., 2:4].contiguous().view(torch.float16).double().squeeze(-1)
        exact = exact + (mins @ (s.double() - d.double() * q.double().view(len(x), -1, 32).sum(-1)).T).T
    return exact, xq.abs() @ w.abs().T


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_equals_gguf_py(type_name: str) -> None:
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    blocks = _blocks(w, type_name)
    assert blocks.shape == (37, row_bytes(type_name, 96))
    ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[type_name])
    assert torch.equal(dequantize(blocks, type_name, 96, fast=False), torch.from_numpy(ref))
    if kernels.kernel_available():  # the C++ loop, and its bf16 rounding
        assert torch.equal(dequantize(blocks, type_name, 96), torch.from_numpy(ref))
        assert torch.equal(dequantize(blocks, type_name, 96, torch.bfloat16), torch.from_numpy(ref).bfloat16())
    rows = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(dequantize_rows(blocks, type_name, 96, rows), torch.from_numpy(ref)[rows])


def test_row_bytes_needs_whole_blocks() -> None:
    assert row_bytes("Q4_1", 64) == 40 and row_bytes("Q8_0", 32) == 34 and row_bytes("Q6_K", 256) == 210
    with pytest.raises(ValueError, match="whole blocks of 32"):
        row_bytes("Q4_0", 48)
    with pytest.raises(ValueError, match="unknown block type"):
        row_bytes("Q3_X", 32)


# ---------------------------------------------------------------- kernels


@needs_kernel
def test_paths_offered_are_what_the_cpu_has() -> None:
    assert kernels.available_isas() == _expected_isas()
    assert kernels.isa() == _expected_isas()[-1]


@needs_kernel
def test_activation_quantization_is_llama_cpps() -> None:
    """q = round-half-even(x * 127 / max|x|), d = fp16(max|x| / 127), s = fp16(d * sum q) per block of 32."""
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)) * 4
    x[1, :32] = 0.0  # an all-zero block: d = 0, q = 0
    x[2, 32:64] = torch.linspace(-2.5, 2.5, 32)  # values on ties after scaling
    q, d, s = torch.ops.llamalab_quant.quantize_activations(x)
    blocks = x.view(3, 4, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    want_q = torch.round(blocks * inv.unsqueeze(-1)).to(torch.int8)  # torch.round: half to even
    assert torch.equal(q.view(3, 4, 32), want_q)
    assert torch.equal(d, (amax / 127.0).half().float())
    assert torch.equal(s, ((amax / 127.0) * want_q.sum(-1).float()).half().float())
    assert torch.equal(q[1, :32], torch.zeros(32, dtype=torch.int8)) and d[1, 0] == 0


@needs_kernel
@pytest.mark.parametrize("type_name", TYPES)
# Row counts off the kernels' groups of 4 and 8; 2-5 rows of x: the prefill kernels that take 2, 3
# or 4 rows of x at once, and their remainders; 16 and more: the panels (AVX-512) and the AMX tiles
# (Q8_0 in place, 16 rows at a time; K = 1536 in slices), a last partial group of weight rows and a
# last partial set of rows of x; 8 and 12 rows against 1030 weight rows: AMX's 8-column tiles and a
# part-filled 16-column one; 2-9 rows against 16-row groups and a remainder: the lane kernels (AVX-512,
# 16 weight rows x up to 8 rows of x, then the last rows of x and of W by the others); 40 rows: AMX's
# int8 tiles (from 32 rows for these types, below the bf16 tiles' 64: see the next test).
@pytest.mark.parametrize("n,k,m", [(1, 32, 1), (3, 64, 2), (7, 576, 1), (16, 96, 2), (13, 576, 3), (13, 576, 5),
                                   (13, 576, 16), (64, 1536, 17), (21, 96, 33), (1030, 64, 8), (1030, 96, 12),
                                   (35, 576, 8), (48, 1536, 9), (32, 64, 6), (50, 96, 3), (16, 32, 7), (40, 160, 4),
                                   (40, 96, 40)])
def test_kernel_equals_float64_reference(type_name: str, n: int, k: int, m: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    blocks = _blocks(torch.randn(n, k, generator=g) * 0.05, type_name)
    x = torch.randn(m, k, generator=g) * 3
    exact, bound = _reference(x, blocks, type_name)
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            y = kernels.qmatmul(x, [blocks], [type_name])
        assert y.dtype == torch.float32 and y.shape == (m, n)
        # fp32 accumulation of k products: a few ulps of the sum of magnitudes.
        assert ((y.double() - exact).abs() / bound).max() < 1e-6, isa


def _has_amx_bf16() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"amx_bf16", "avx512_bf16"} <= set(flags)


@needs_kernel
@pytest.mark.skipif(not _has_amx_bf16(), reason="the CPU lacks AMX-BF16 (the bf16 tiles for long prompts)")
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K"])
# 130 rows of x: 9 chunks of 16 (the last in a pair with zeros); 40 weight rows: a group of 32 and a
# partial one whose second panel is empty; 64 rows of Q8_0: its blocks read in place; 70 rows of x:
# near the tiles' threshold (64), a last chunk of 6.
@pytest.mark.parametrize("n,k,m", [(40, 512, 130), (64, 256, 128), (16, 1536, 129), (24, 256, 70)])
def test_amx_bf16_tiles_equal_the_bf16_product(type_name: str, n: int, k: int, m: int) -> None:
    """From 64 rows of x the amx path rounds x and the dequantized weights to bf16 and sums in
    fp32 in the tiles: equal, to fp32 accumulation, to the float64 product of those bf16 values
    (plus the residual), the weights dequantized by our dequantizer (equal to gguf-py's, above)."""
    if "amx" not in kernels.available_isas():
        pytest.skip("no amx path here")
    g = torch.Generator().manual_seed(n + k + m)
    blocks = (_more_blocks(n, k, type_name, seed=n) if type_name == "Q4_K"
              else _blocks(torch.randn(n, k, generator=g) * 0.05, type_name))
    x = torch.randn(m, k, generator=g) * 3
    res = torch.randn(m, n, generator=g)
    xb, wb = x.bfloat16().double(), dequantize(blocks, type_name, k).bfloat16().double()
    want, bound = xb @ wb.T + res.double(), xb.abs() @ wb.abs().T
    with kernels.use_isa("amx"):
        y = kernels.qmatmul(x, [blocks], [type_name], res)
    assert ((y.double() - want).abs() <= 1e-6 * bound + 1e-6).all(), type_name


@needs_kernel
@pytest.mark.skipif(not _has_amx_bf16(), reason="the CPU lacks AMX-BF16 (the bf16 tiles for prompts)")
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_prompt_tiles_follow_the_tokens_of_one_sequence(type_name: str) -> None:
    """A 3-D x (prompts, tokens, k) takes the bf16 tiles from kernels.bf16_min_tokens() tokens a
    prompt whatever the number of prompts: 3 prompts of 20 tokens (60 rows, under the 64 rows a 2-D x
    needs) equal the bf16 product, 5 prompts of one token fewer than the threshold (75 rows) equal
    the int8 product (the reference of test_kernel_equals_float64_reference), as each prompt alone."""
    if "amx" not in kernels.available_isas():
        pytest.skip("no amx path here")
    with kernels.use_isa("amx"):
        cut = kernels.bf16_min_tokens()
    with kernels.use_isa("avx512vnni"):
        assert kernels.bf16_min_tokens() == 0
    assert cut >= 2
    g = torch.Generator().manual_seed(7)
    n, k = 40, 576
    blocks = _blocks(torch.randn(n, k, generator=g) * 0.05, type_name)
    wb = dequantize(blocks, type_name, k).bfloat16().double()
    for shape in ((3, max(cut, 20), k), (1, cut, k)):
        x = torch.randn(*shape, generator=g) * 3
        xb = x.reshape(-1, k).bfloat16().double()
        with kernels.use_isa("amx"):
            y = kernels.qmatmul(x, [blocks], [type_name]).reshape(-1, n)
        assert ((y.double() - xb @ wb.T).abs() <= 1e-6 * (xb.abs() @ wb.abs().T) + 1e-6).all(), shape
    x = torch.randn(5, cut - 1, k, generator=g) * 3
    exact, bound = _reference(x.reshape(-1, k), blocks, type_name)
    with kernels.use_isa("amx"):
        y = kernels.qmatmul(x, [blocks], [type_name]).reshape(-1, n)
    assert ((y.double() - exact).abs() / bound).max() < 1e-6


@needs_kernel
def test_one_call_for_several_weights_is_their_concatenation() -> None:
    g = torch.Generator().manual_seed(2)
    ws = [_blocks(torch.randn(n, 96, generator=g), t) for n, t in ((9, "Q4_1"), (5, "Q8_0"), (6, "Q4_0"))]
    x = torch.randn(2, 1, 96, generator=g)
    together = kernels.qmatmul(x, ws, ["Q4_1", "Q8_0", "Q4_0"])
    apart = torch.cat([kernels.qmatmul(x, [w], [t]) for w, t in zip(ws, ["Q4_1", "Q8_0", "Q4_0"])], dim=-1)
    assert together.shape == (2, 1, 20) and torch.equal(together, apart)


@needs_kernel
def test_norm_swiglu_and_residual_inside_the_call() -> None:
    g = torch.Generator().manual_seed(3)
    blocks = _blocks(torch.randn(10, 64, generator=g), "Q4_1")
    x, gamma, res = torch.randn(3, 64, generator=g), torch.rand(64, generator=g) + 0.5, torch.randn(3, 10, generator=g)
    normed = F.rms_norm(x, (64,), eps=1e-5) * gamma
    assert torch.allclose(kernels.qmatmul(x, [blocks], ["Q4_1"], res, norm=gamma, eps=1e-5),
                          kernels.qmatmul(normed, [blocks], ["Q4_1"]) + res, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(3, 128, generator=g)
    gated = F.silu(gate_up[:, :64]) * gate_up[:, 64:]
    assert torch.allclose(kernels.qmatmul(gate_up, [blocks], ["Q4_1"], swiglu=True),
                          kernels.qmatmul(gated, [blocks], ["Q4_1"]), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_rejects_bad_input() -> None:
    blocks = _blocks(torch.randn(4, 64), "Q8_0")
    with pytest.raises(RuntimeError, match="fp32 CPU input"):
        kernels.qmatmul(torch.randn(1, 64, dtype=torch.bfloat16), [blocks], ["Q8_0"])
    with pytest.raises(RuntimeError, match="input of 32 features for weights of 64 columns"):
        kernels.qmatmul(torch.randn(1, 32), [blocks], ["Q8_0"])
    with pytest.raises(RuntimeError, match="not whole Q4_1 blocks"):
        kernels.qmatmul(torch.randn(1, 64), [blocks], ["Q4_1"])
    with pytest.raises(RuntimeError, match="weights of 64 and 32 columns"):
        kernels.qmatmul(torch.randn(1, 64), [blocks, _blocks(torch.randn(4, 32), "Q8_0")], ["Q8_0", "Q8_0"])
    with pytest.raises(ValueError, match="unknown block type"):
        kernels.qmatmul(torch.randn(1, 64), [blocks], ["Q9_9"])


def test_forcing_a_path_the_cpu_lacks_is_an_error() -> None:
    env = {**os.environ, "LLAMALAB_QUANT_ISA": "avx9000"}
    out = subprocess.run([sys.executable, "-c", "from llamalab.quant import kernels; print(kernels.isa())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("none: LLAMALAB_QUANT_ISA=avx9000") and "unknown path" in out


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("type_name", TYPES)
def test_quantized_linear_kernel_and_reference_paths(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    blocks = _blocks(torch.randn(24, 64, generator=g) * 0.1, type_name)
    lin = QuantizedLinear(blocks, type_name, 64)
    x = torch.randn(2, 3, 64, generator=g)
    exact = x @ dequantize(blocks, type_name, 64).T
    if lin.uses_kernel:
        got = lin(x)
        assert got.shape == (2, 3, 24)
        # The int8 activations: ~1/254 of each block's largest value.
        assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    monkeypatch.setattr(kernels, "_built", "forced off for this test")
    assert not lin.uses_kernel
    assert torch.allclose(lin(x), exact, atol=1e-5)  # the reference: dequantize, then F.linear
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected uint8 blocks"):
        QuantizedLinear(blocks[:, :-1], type_name, 64)


def test_quantized_embedding_reads_rows() -> None:
    blocks = _blocks(torch.randn(50, 64), "Q8_0")
    emb = QuantizedEmbedding(blocks, "Q8_0", 64)
    tokens = torch.tensor([[0, 49, 7]])
    assert torch.equal(emb(tokens), dequantize(blocks, "Q8_0", 64)[tokens])
    assert emb.weight.dtype == torch.float32 and emb.weight.device.type == "cpu"


# ---------------------------------------------------------------- models from GGUF files


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer()


@pytest.fixture(scope="module")
def small_hf() -> Any:
    return make_hf_model("llama2-gqa", seed=8, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.05)


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_runs_in_its_blocks(type_name: str, tmp_path: Path, tok: Any, small_hf: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gguf(tmp_path / f"tiny-{type_name}.gguf", small_hf, type_name, tok)
    lm = llamalab.load(path, dtype=None)
    model = lm.model
    assert lm.checkpoint_metadata["quantized"] is True
    layer = model.layers[0]
    assert all(isinstance(getattr(layer.attention, n), QuantizedLinear) for n in ("wq", "wk", "wv", "wo"))
    assert all(isinstance(getattr(layer.feed_forward, n), QuantizedLinear) for n in ("w1", "w2", "w3"))
    assert isinstance(model.tok_embeddings, QuantizedEmbedding) and isinstance(model.output, QuantizedLinear)
    # No copy: the blocks are views of the file's memory map.
    assert not layer.attention.wq.blocks.untyped_storage().resizable()
    x = tokens_for(small_hf.config.vocab_size)
    ref = hf_logits(transformers_gguf(path), x)  # the dequantized model, independent loader
    with torch.no_grad():
        got = model(x)
        if layer.attention.wq.uses_kernel:
            assert (got - ref).abs().max() < 0.05 * ref.abs().max()
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        monkeypatch.setattr(kernels, "_built", "forced off for this test")
        assert torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4)  # the reference path is the dequantized model


@needs_kernel
def test_decode_model_on_blocks_equals_the_plain_quantized_model(tmp_path: Path, tok: Any, small_hf: Any) -> None:
    from llamalab.generate.fast import optimize_for_decode

    path = write_gguf(tmp_path / "tiny-Q4_1.gguf", small_hf, "Q4_1", tok)
    model = llamalab.load(path, dtype=None).model
    fast = optimize_for_decode(model)
    x = tokens_for(small_hf.config.vocab_size, batch=1)
    with torch.no_grad():
        plain = model(x)
        full = fast(x)  # prefill through the fused calls
        # The fused calls normalise x in C++, the plain path in torch: their fp32 results can differ
        # in the last bit, and that can move one activation across an int8 rounding boundary (one
        # step d_x = max|x| / 127 in one element), so the paths agree to a fraction of the int8
        # step's effect, not bit for bit; the tokens they choose are the same.
        tol = 0.02 * float(plain.abs().max())
        assert (full - plain).abs().max() < tol and (full.argmax(-1) == plain.argmax(-1)).all()
        fast.setup_cache(1, x.shape[1])
        steps = [fast(x[:, :4], input_pos=torch.arange(4))[:, -1]]
        for pos in range(4, x.shape[1]):  # one-token steps: the kernel's decode path
            steps.append(fast(x[:, pos:pos + 1], input_pos=torch.tensor([pos]))[:, -1])
        steps = torch.stack(steps, 1)
        assert (steps - plain[:, 3:]).abs().max() < tol and (steps.argmax(-1) == plain[:, 3:].argmax(-1)).all()


@pytest.mark.slow
@needs_kernel
def test_compiled_step_on_blocks_equals_the_eager_one(tmp_path: Path, tok: Any, small_hf: Any) -> None:
    """``optimize_for_decode(compile=True)`` on a quantized GGUF: torch.compile traces the kernel's ops
    (their shape rules: the embedding's row lookup and the products) in one graph, and the compiled
    steps give the eager fused path's tokens and logits."""
    from llamalab.generate.fast import optimize_for_decode

    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", small_hf, "Q8_0", tok)
    model = llamalab.load(path, dtype=None).model
    prompt = tokens_for(small_hf.config.vocab_size, batch=1)[0, :6].tolist()

    def greedy(m: Any) -> tuple[list[int], torch.Tensor]:
        m.setup_cache(1, 20)
        with torch.inference_mode():
            logits = [m(torch.tensor([prompt]), input_pos=torch.arange(6))[0, -1]]
            for pos in range(6, 16):
                logits.append(m(logits[-1].argmax().view(1, 1), input_pos=torch.tensor([pos]))[0, -1])
        m.clear_cache()
        return [int(v.argmax()) for v in logits], torch.stack(logits)

    ids_eager, logits_eager = greedy(optimize_for_decode(model))
    compiled = optimize_for_decode(model, compile=True)
    ids, logits = greedy(compiled)
    assert compiled._compiled_for  # the compiled graph ran
    assert ids == ids_eager
    torch.testing.assert_close(logits, logits_eager, atol=1e-4, rtol=0)


def test_a_float_dtype_dequantizes_at_load(tmp_path: Path, tok: Any, small_hf: Any) -> None:
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", small_hf, "Q8_0", tok)
    model = llamalab.load(path, dtype=torch.float32).model
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
    x = tokens_for(small_hf.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(model(x), hf_logits(transformers_gguf(path), x), atol=1e-4, rtol=1e-4)


def test_k_quants_without_a_kernel_are_dequantized_with_a_line(tmp_path: Path, tok: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    hf = make_hf_model("llama2-gqa", seed=8, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.05)
    types = {f"blk.{i}.ffn_down.weight": "Q3_K" for i in range(hf.config.num_hidden_layers)}
    path = write_gguf(tmp_path / "mixed.gguf", hf, "Q4_1", tok, tensor_types=types)
    model = llamalab.load(path, dtype=None).model
    assert isinstance(model.layers[0].feed_forward.w2, torch.nn.Linear)
    assert isinstance(model.layers[0].feed_forward.w1, QuantizedLinear)
    err = capsys.readouterr().err
    assert f"no kernel yet for {hf.config.num_hidden_layers} Q3_K weight(s): dequantized to fp32 at load" in err


# ---------------------------------------------------------------- the real model


def _real_model() -> Path:
    from llamalab.checkpoint.base import CheckpointError
    from llamalab.checkpoint.registry import resolve

    try:
        return resolve("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


# llama.cpp's logits at every position of each id list read from stdin (also used by test_gguf_write).
LLAMA_CPP_LOGITS = r"""
import json, sys, numpy as np
# llamalab's llama.cpp opener without importing llamalab (which imports torch: two OpenMP users in
# one process have crashed llama.cpp here).
import importlib.util, pathlib
_spec = importlib.util.spec_from_file_location("llamalab_llama_cpp", pathlib.Path(
    importlib.util.find_spec("llamalab").origin).parent / "quant" / "llama_cpp.py")
_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_peer)
open_llama_cpp = _peer.open_llama_cpp
# An fp32 KV cache, as ours (llama.cpp's default is fp16).
llm = open_llama_cpp(sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, type_k=0, type_v=0)
out = []
for ids in json.load(sys.stdin):
    llm.reset()
    llm.eval(ids)
    out.append(np.asarray(llm.scores[:len(ids)]).tolist())
print(json.dumps(out))
"""

TEXTS = ["The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
         "movable metal type, oil-based ink and a screw press.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
         "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n17 * 23 = 391."]


@needs_kernel
def test_real_file_runs_quantized_without_copying_it() -> None:
    path = _real_model()
    lm = llamalab.load(path, dtype=None)
    model = lm.model
    kinds = {type(m).__name__ + ":" + m.type_name for m in model.modules() if hasattr(m, "type_name")}
    assert kinds == {"QuantizedLinear:Q4_1", "QuantizedLinear:Q8_0", "QuantizedEmbedding:Q8_0"}
    assert model.output.blocks.data_ptr() == model.tok_embeddings.blocks.data_ptr()  # the tied head
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert float_bytes < 1_000_000  # the norms only: every matrix stays in the file's blocks


@pytest.mark.slow
@needs_kernel
def test_real_file_next_token_distributions_match_llama_cpp() -> None:
    """Teacher-forced on three texts, every position: our quantized model's next-token distribution
    against llama.cpp's on the same file (its own kernels, the same int8 activations).

    Greedy text is not compared token for token: the two differ by fp32 summation order, and a
    near-tie anywhere parts the continuations (measured: 4-64 equal tokens by prompt).
    """
    pytest.importorskip("llama_cpp")
    path = _real_model()
    lm = llamalab.load(path, dtype=None)
    texts = [lm.tokenizer.encode(t, allow_special=True) for t in TEXTS]
    # llama.cpp in its own process: its OpenMP runtime and torch's do not share one well.
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(path)], input=json.dumps(texts),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    agree = total = 0
    for ids, theirs in zip(texts, json.loads(run.stdout)):
        ref = torch.tensor(theirs)
        with torch.no_grad():
            ours = lm.model(torch.tensor([ids]))[0]
        kl = F.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        assert kl.max() < 0.1, kl.max()  # measured: 0.04
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    assert agree >= 0.9 * total  # measured: 93 of 96


# llama.cpp's greedy continuation of each id list read from stdin, with its logits at every step.
LLAMA_CPP_GREEDY = r"""
import json, sys, importlib.util, pathlib, numpy as np
_spec = importlib.util.spec_from_file_location("llamalab_llama_cpp", pathlib.Path(
    importlib.util.find_spec("llamalab").origin).parent / "quant" / "llama_cpp.py")
_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_peer)
llm = _peer.open_llama_cpp(sys.argv[1], n_ctx=512, n_threads=2, logits_all=True, type_k=0, type_v=0)
new = int(sys.argv[2])
out = []
for ids in json.load(sys.stdin):
    llm.reset()
    toks = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        toks.append(int(t))
        if len(toks) == new:
            break
    out.append([toks, np.asarray(llm.scores[len(ids) - 1:len(ids) - 1 + len(toks)]).tolist()])
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_kernel
def test_real_file_greedy_equals_llama_cpps_but_at_near_ties() -> None:
    """llama.cpp's 64 greedy tokens after each prompt, fed through our quantized model: at every step
    our greedy choice is llama.cpp's, except where llama.cpp's own top two logits are within 0.5,
    and at no more than 5% of the steps.

    (Free-running greedy text is compared this way because the two sum in different orders: a
    near-tie, which either order can flip, parts the continuations for good. Why 0.5: each layer
    quantizes its input to int8 per block of 32 as llama.cpp does, so a different summation order
    can move a value across a rounding boundary and the step apart grows over 30 layers; measured
    on a 72-token prompt, our own avx2, avx512vnni and amx paths differ from one another by 0.2-0.3
    logits on average (2.7 at most), each 0.2-0.25 from the dequantized fp32 model. Measured against
    llama.cpp on the VNNI path, 5 steps of 320 disagreed, at gaps 0.002-0.15; on the AMX path one
    disagreement came at 0.36.)
    """
    pytest.importorskip("llama_cpp")
    path = _real_model()
    lm = llamalab.load(path, dtype=None)
    prompts = TEXTS + ["Once upon a time",
                       "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
    texts = [lm.tokenizer.encode(t, allow_special=True) for t in prompts]
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_GREEDY, str(path), "64"], input=json.dumps(texts),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    disagree = 0
    for ids, (toks, scores) in zip(texts, json.loads(run.stdout)):
        theirs = torch.tensor(scores)
        assert len(toks) == 64 and torch.equal(theirs.argmax(-1), torch.tensor(toks))
        with torch.no_grad():
            ours = lm.model(torch.tensor([ids + toks[:-1]]))[0, len(ids) - 1:]
        top2 = theirs.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        parted = ours.argmax(-1) != theirs.argmax(-1)
        assert (gap[parted] < 0.5).all(), (gap[parted], prompts[texts.index(ids)])
        disagree += int(parted.sum())
    assert disagree <= 0.05 * 64 * len(texts), disagree


@pytest.mark.parametrize("type_name", TYPES)
def test_round_to_nearest_is_gguf_pys_bit_for_bit(type_name: str) -> None:
    from llamalab.quant.blocks import quantize

    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 128, generator=g) * torch.rand(40, 1, generator=g) * 3
    w[0] = 0.0  # a row of zero blocks
    w[1, :32] = torch.linspace(-1, 1, 32)  # values on the rounding ties
    w[2, 32:64] = 7.0  # a constant block (max == min)
    w[3, :32] = -torch.arange(32.0) / 4  # the extreme negative
    w = w.to(torch.bfloat16).float()  # coarse values: many exact halves after scaling
    want = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(quantize(w, type_name).numpy(), want)


# ------------------------------------------------------- Q5_0 / Q5_1 / Q4_K / Q6_K kernels

MORE_TYPES = ["Q5_0", "Q5_1", "Q4_K", "Q6_K"]


def _more_blocks(n: int, k: int, type_name: str, seed: int) -> torch.Tensor:
    """Blocks of ``type_name``: gguf-py's quantizer for Q5_0/Q5_1; random K-quant blocks (sane fp16
    scales, every bit pattern of the rest) read by gguf-py's dequantizer in the reference."""
    g = torch.Generator().manual_seed(seed)
    if type_name in ("Q5_0", "Q5_1"):
        return _blocks(torch.randn(n, k, generator=g) * 0.1, type_name)
    from test_checkpoint import _random_kquant

    rng = np.random.default_rng(seed)
    return torch.from_numpy(_random_kquant((n, k), gguf.GGMLQuantizationType[type_name], rng))


@needs_kernel
@pytest.mark.parametrize("type_name", MORE_TYPES)
@pytest.mark.parametrize("n,k,m", [(1, 256, 1), (7, 512, 2), (13, 1536, 3), (16, 256, 5), (3, 256, 4),
                                   (21, 512, 33), (18, 1536, 17), (1030, 256, 8)])
def test_more_types_kernel_equals_float64_reference(type_name: str, n: int, k: int, m: int) -> None:
    blocks = _more_blocks(n, k, type_name, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    exact, bound = _reference(x, blocks, type_name)
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            y = kernels.qmatmul(x, [blocks], [type_name])
        assert ((y.double() - exact).abs() <= 1e-6 * bound + 1e-30).all(), (isa, type_name)


@needs_kernel
def test_more_types_in_one_call_with_the_others() -> None:
    """A Q4_K_M-like layer: Q4_K, Q6_K and Q8_0 weights of one input, outputs side by side."""
    k = 512
    parts = [(_more_blocks(12, k, "Q4_K", 1), "Q4_K"), (_more_blocks(5, k, "Q6_K", 2), "Q6_K"),
             (_blocks(torch.randn(9, k) * 0.1, "Q8_0"), "Q8_0"), (_more_blocks(3, k, "Q5_0", 3), "Q5_0")]
    x = torch.randn(3, k)
    y = kernels.qmatmul(x, [b for b, _ in parts], [t for _, t in parts])
    want = torch.cat([_reference(x, b, t)[0] for b, t in parts], dim=1)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 6, 19])
def test_every_type_in_one_call_with_a_residual(m: int) -> None:
    """All seven types in one call (at 6 and 19 rows of x some weights go through panels and some not),
    the residual added: the concatenation of the float64 references plus the residual."""
    k = 512
    parts = [(_more_blocks(12, k, "Q4_K", 1), "Q4_K"), (_more_blocks(5, k, "Q6_K", 2), "Q6_K"),
             (_more_blocks(9, k, "Q5_0", 3), "Q5_0"), (_more_blocks(10, k, "Q5_1", 4), "Q5_1")]
    g = torch.Generator().manual_seed(m)
    parts += [(_blocks(torch.randn(r, k, generator=g) * 0.1, t), t) for r, t in ((11, "Q8_0"), (17, "Q4_0"), (3, "Q4_1"))]
    x = torch.randn(m, k, generator=g)
    res = torch.randn(m, sum(b.shape[0] for b, _ in parts), generator=g)
    want = torch.cat([_reference(x, b, t)[0] for b, t in parts], dim=1) + res.double()
    bound = torch.cat([_reference(x, b, t)[1] for b, t in parts], dim=1)
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            y = kernels.qmatmul(x, [b for b, _ in parts], [t for _, t in parts], res)
        assert ((y.double() - want).abs() <= 1e-6 * bound + 1e-6).all(), isa


def test_more_types_run_quantized_in_a_model(tmp_path: Path) -> None:
    """A GGUF with Q4_K / Q6_K / Q5_0 layers keeps them in blocks (and runs them on the kernel)."""
    from llamalab.checkpoint import read_checkpoint
    from llamalab.quant.gguf import quantized_model

    tok = train_tokenizer()
    hf = make_hf_model("llama2-gqa", seed=3, hidden_size=256, intermediate_size=512)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, "Q4_K", tok)
    ckpt = read_checkpoint(path)
    model = quantized_model(ckpt)
    assert isinstance(model.layers[0].attention.wq, QuantizedLinear)
    assert model.layers[0].attention.wq.type_name == "Q4_K"
    x = tokens_for(hf.config.vocab_size)
    with torch.no_grad():
        ours = model(x)
        plain = llamalab.load(path, dtype=torch.float32).model(x)
    assert (ours - plain).abs().max() < 0.05 * plain.abs().max()
