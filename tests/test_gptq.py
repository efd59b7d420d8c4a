"""Quantization grids, GPTQ and `llamalab quantize`.

Checked against independent things: gguf-py's quantizer (bit for bit, Q8_0/Q4_0/Q4_1) and its
dequantizers (every type's byte layout, K-quants included); the GPTQ paper's own equations (2)-(3),
an explicit inverse-Hessian down-date per column, beside our Cholesky / lazy-batch form; the
identity Hessian, for which GPTQ must be round-to-nearest; and the real SmolLM2 layers.
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

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import make_hf_model, save_hf, train_tokenizer  # noqa: E402

import llamalab  # noqa: E402
from llamalab.checkpoint import read_checkpoint  # noqa: E402
from llamalab.quant.blocks import quantize  # noqa: E402
from llamalab.quant.gptq import Hessian, gptq_matrix, layer_error  # noqa: E402
from llamalab.quant.grids import FORMATS, block_format, format_for  # noqa: E402

TYPES = list(FORMATS)
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q3_K": 3}


def _weight(rows: int = 32, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, :32] = 0.0  # a zero block
    w[2, 256:] = 0.0  # a zero super-block
    w[3, :256] = 0.02  # a constant super-block
    w[4, 7] = 0.9  # an outlier
    w[5] *= 30  # a row of large weights
    return w


def _hessian(cols: int, seed: int = 1, tokens: int = 2048) -> torch.Tensor:
    """Correlated inputs with very unequal scales, as an LLM's activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.1, 4, cols)
    h = Hessian(cols)
    h.add(x)
    return h.value


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_round_to_nearest_is_gguf_py_bit_for_bit(name: str) -> None:
    w = _weight()
    blocks, _ = FORMATS[name].rtn(w)
    want = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name])
    assert np.array_equal(blocks.numpy(), want)
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        assert torch.equal(blocks, quantize(w, name))


@pytest.mark.parametrize("name", TYPES)
def test_layout_read_back_by_gguf_py(name: str) -> None:
    w = _weight()
    blocks, value = FORMATS[name].rtn(w)
    assert blocks.shape == (w.shape[0], w.shape[1] // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]
                            * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1])
    theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name]).reshape(w.shape)
    assert np.array_equal(theirs, value.numpy())
    # Round-to-nearest is within a grid step of every weight (relative to the row's scale).
    bits = BITS[name]
    rel = ((w - value).norm(dim=1) / w.norm(dim=1).clamp_min(1e-12))
    assert float(rel[torch.arange(32) != 2].max()) < 2.5 * 2.0 ** -bits
    assert torch.all(value[2, 256:] == 0) and torch.all(value[1, :32] == 0)


def _obs_reference(w: torch.Tensor, h: torch.Tensor, name: str, act_order: bool, damp: float) -> torch.Tensor:
    """The paper's equations (2)-(3) written out, float64: round column q, move the others by
    ``-(w_q - quant(w_q)) / [H^-1]_qq * (H^-1)_{:,q}``, then remove q from H^-1 by Gaussian
    elimination. Static group scales (fitted on the original weights) in act order; without it each
    group's scales are fitted when its first column is reached."""
    fmt = FORMATS[name]
    w = w.double().clone()
    rows, cols = w.shape
    h = h.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = torch.linalg.inv(h)
    order = torch.argsort(h.diagonal() - damp * float(h.diagonal().mean()), descending=True, stable=True) \
        if act_order else torch.arange(cols)
    grid = fmt.fit(w.float())[0] if act_order else None
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for q in order.tolist():
        if act_order:
            col = q
        else:
            if q % fmt.group == 0:
                grid = fmt.fit(w[:, q:q + fmt.group].float())[0]
            col = q % fmt.group
        v = grid.value(grid.round(w[:, q].float(), col), col).double()
        out[:, q] = v
        err = (w[:, q] - v) / hinv[q, q]
        w -= err.unsqueeze(1) * hinv[:, q].unsqueeze(0)
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return out.float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K"])
def test_gptq_equals_the_papers_equations(name: str, act_order: bool) -> None:
    w = _weight(rows=16, cols=256, seed=3)
    h = _hessian(256, seed=4)
    ours = gptq_matrix(w, h, name, act_order=act_order, damp=0.01)
    ref = _obs_reference(w, h, name, act_order, 0.01)
    # float32 (ours) against float64 (reference): a weight may land on the other side of a
    # rounding boundary now and then; everything else is equal.
    same = torch.isclose(ours.weight, ref, rtol=1e-4, atol=1e-6)
    assert same.float().mean() > 0.99
    assert layer_error(w, ours.weight, h) == pytest.approx(layer_error(w, ref, h), rel=0.02)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_identity_hessian_gives_round_to_nearest(name: str, act_order: bool) -> None:
    w = _weight()
    res = gptq_matrix(w, torch.eye(w.shape[1], dtype=torch.float64), name, act_order=act_order, damp=0.0)
    assert torch.equal(res.blocks, FORMATS[name].rtn(w)[0])


@pytest.mark.parametrize("name", TYPES)
def test_gptq_lowers_the_output_error(name: str) -> None:
    w = _weight()
    h = _hessian(w.shape[1])
    for act_order in (False, True):
        res = gptq_matrix(w, h, name, act_order=act_order)
        assert res.rtn_error == pytest.approx(layer_error(w, FORMATS[name].rtn(w)[1], h))
        assert res.error < 0.9 * res.rtn_error
        theirs = gguf.quants.dequantize(res.blocks.numpy(), gguf.GGMLQuantizationType[name]).reshape(w.shape)
        assert np.array_equal(theirs, res.weight.numpy())  # the blocks are what GPTQ chose


def test_fallback_for_rows_that_are_not_whole_super_blocks() -> None:
    assert format_for("q4_k", 576).name == "Q5_0" and format_for("q4_k", 1536).name == "Q4_K"
    assert format_for("q3_k", 576).name == "Q4_0" and format_for("q4_0", 576).name == "Q4_0"
    with pytest.raises(ValueError, match="not whole Q4_0 blocks"):
        format_for("q4_0", 100)


def test_dead_inputs_and_bad_shapes() -> None:
    w = _weight(rows=8, cols=64)
    h = _hessian(64)
    h[5, :] = 0
    h[:, 5] = 0  # an input never active in calibration
    res = gptq_matrix(w, h, "Q4_0", act_order=True)
    assert torch.isfinite(res.weight).all()
    with pytest.raises(ValueError, match="whole blocks of 256"):
        gptq_matrix(w, h, "Q4_K")
    with pytest.raises(ValueError, match="q4_k"):
        block_format("q5_k")


@pytest.fixture(scope="module")
def smol_layer0() -> dict[str, Any]:
    """The real SmolLM2 layer 0's q and down projections with their Hessians from real text."""
    lm = llamalab.load("smollm2-135m-instruct", dtype=torch.float32)
    text = (Path(__file__).parent.parent / "README.md").read_text()[:6000]
    ids = torch.tensor([lm.tokenizer.encode(text)[:512]])
    layer = lm.model.layers[0]
    hq, hd = Hessian(layer.attention.wq.in_features), Hessian(layer.feed_forward.w2.in_features)
    hooks = [layer.attention.wq.register_forward_pre_hook(lambda m, a: hq.add(a[0])),
             layer.feed_forward.w2.register_forward_pre_hook(lambda m, a: hd.add(a[0]))]
    with torch.no_grad():
        lm.model.layers[0](lm.model.tok_embeddings(ids), lm.model.rope[:ids.shape[1]].unsqueeze(0), None, None)
    for hook in hooks:
        hook.remove()
    return {"wq": (layer.attention.wq.weight.detach().clone(), hq.value),
            "w2": (layer.feed_forward.w2.weight.detach().clone(), hd.value)}


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K"])
def test_gptq_beats_round_to_nearest_on_smollm2(name: str, smol_layer0: dict[str, Any]) -> None:
    # SmolLM2's 576-wide inputs are not whole Q3_K super-blocks: only its down projection (1536) is.
    for w, h in (smol_layer0.values() if name == "Q4_0" else [smol_layer0["w2"]]):
        res = gptq_matrix(w, h, name)
        assert res.error < 0.8 * res.rtn_error


# ------------------------------------------------------------------------------- llamalab quantize


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamalab.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    tok = train_tokenizer()
    hf = make_hf_model("llama2-gqa", seed=7, hidden_size=256, intermediate_size=512, max_position_embeddings=128)
    root = tmp_path_factory.mktemp("quantize")
    calib = root / "calib.txt"
    calib.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    return hf, save_hf(hf, root / "hf", tok), calib


@pytest.mark.parametrize("kind", ["q4_0", "q3_k", "q4_k"])
def test_quantize_cli_rtn_and_gptq(kind: str, tiny_hf: tuple[Any, Path, Path], tmp_path: Path) -> None:
    hf, src, calib = tiny_hf
    rtn, gptq = tmp_path / "rtn.gguf", tmp_path / "gptq.gguf"
    r = _cli("quantize", str(src), str(rtn), "--type", kind, "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("quantize", str(src), str(gptq), "--type", kind, "--gptq", "--calib", str(calib), "--calib-samples", "8",
             "--calib-seq-len", "64", "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "gptq" in r.stderr and "round-to-nearest" in r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "gptq" and report["output_error"]["ratio"] < 1.0
    assert report["calibration"]["samples"] == 8 and report["calibration"]["seq_len"] == 64
    assert report["tensors"] == {kind.upper(): 14, "Q8_0": 2}
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for path in (rtn, gptq):
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    # Round-to-nearest: the file holds gguf-py's dequantizer's reading of our grid of the HF weights.
    ckpt = read_checkpoint(src)
    reader = {t.name: t for t in gguf.GGUFReader(rtn).tensors}
    w = ckpt.state_dict["layers.1.feed_forward.w2.weight"].float()
    got = gguf.quants.dequantize(np.asarray(reader["blk.1.ffn_down.weight"].data), qtype).reshape(w.shape)
    assert np.array_equal(got, FORMATS[kind.upper()].rtn(w)[1].numpy())
    # Both run; on text like the calibration's, GPTQ's logits are nearer the float model's.
    lm = llamalab.load(rtn, dtype=None)
    x = torch.tensor([lm.tokenizer.encode(calib.read_text()[:400])[:64]])
    with torch.no_grad():
        want = hf(x).logits.float()
        err = {p.name: float(((llamalab.load(p, dtype=None).model(x) - want) ** 2).mean()) for p in (rtn, gptq)}
    assert err["gptq.gguf"] < err["rtn.gguf"], err


def test_quantize_cli_errors(tiny_hf: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, src, calib = tiny_hf
    out = tmp_path / "o.gguf"
    cases = [
        (["--type", "q4_0", "--gptq"], "--gptq needs calibration"),
        (["--type", "q4_0", "--calib", str(calib)], "--calib is for --gptq"),
        (["--type", "q4_0", "--gptq", "--calib", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["--type", "q4_0", "--gptq", "--calib", str(calib), "--calib-seq-len", "100000"], "need at least"),
        (["--type", "q4_0", "--gptq", "--calib", str(calib), "--calib-samples", "0"], "--calib-samples must be"),
    ]
    for extra, message in cases:
        r = _cli("quantize", str(src), str(out), *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not out.exists()
    out.write_bytes(b"keep")
    r = _cli("quantize", str(src), str(out), "--type", "q4_0")
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_bytes() == b"keep"


# ------------------------------------------------------------------- GPTQ's own checkpoint format


def _autogptq_pack_3bit(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ's packer for 3 bits (QuantLinear.pack), transcribed: the layout real GPTQ files have."""
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    iw = intweight.astype(np.uint32)
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i))
        i += 10
        qweight[row] |= iw[i] << 30
        row += 1
        qweight[row] |= (iw[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= iw[i] << 31
        row += 1
        qweight[row] |= (iw[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_is_autogptqs(bits: int) -> None:
    from llamalab.quant.gptq_format import pack_rows, unpack_rows

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (64, 24), generator=g)
    packed = pack_rows(q, bits)
    if bits == 3:
        want = _autogptq_pack_3bit(q.numpy())
    else:  # AutoGPTQ for 2/4/8 bits: 32/bits consecutive rows per word, row k at bit bits*k
        per = 32 // bits
        want = np.zeros((64 // per, 24), dtype=np.uint32)
        for k in range(per):
            want |= q.numpy()[k::per].astype(np.uint32) << (bits * k)
        want = want.view(np.int32)
    assert np.array_equal(packed.numpy(), want)
    assert torch.equal(unpack_rows(packed, bits, 64).long(), q)


def test_gptq_grid_is_the_papers_quantizer() -> None:
    """GPTQ's Quantizer.find_params / quantize, written out: asymmetric min-max holding 0."""
    from llamalab.quant.grids import gptq_format

    w = _weight(rows=8, cols=128)
    _, value = gptq_format(4, 64).rtn(w)
    x = w.reshape(8, 2, 64)
    xmin, xmax = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    scale = ((xmax - xmin) / 15).half().float()
    zero = torch.round(-xmin / scale).clamp(1, 15)
    q = torch.clamp(torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15)
    want = (scale.unsqueeze(-1) * (q - zero.unsqueeze(-1))).reshape(8, 128)
    assert (value != want).float().mean() < 0.01  # ties round half up here, half to even there
    assert torch.allclose(value, want, atol=float(scale.max()) * 1.01)


@pytest.mark.parametrize("bits", [3, 4])
def test_quantize_cli_gptq_format_round_trip(bits: int, tiny_hf: tuple[Any, Path, Path], tmp_path: Path) -> None:
    from llamalab.quant.grids import gptq_format

    hf, src, calib = tiny_hf
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    r = _cli("quantize", str(src), str(rtn), "--format", "gptq", "--bits", str(bits), "--group-size", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("quantize", str(src), str(gptq), "--format", "gptq", "--bits", str(bits), "--group-size", "64",
             "--gptq", "--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "64", "--quiet",
             "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["output_error"]["ratio"] < 1.0
    cfg = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert cfg | {"damp_percent": None} == {
        "quant_method": "gptq", "bits": bits, "group_size": 64, "desc_act": True, "sym": False, "static_groups": True,
        "true_sequential": False, "checkpoint_format": "gptq", "model_file_base_name": "model", "damp_percent": None}
    from safetensors import safe_open

    with safe_open(str(rtn / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").shape == (256 * bits // 32, 256)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qzeros").shape == (4, 256 * bits // 32)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.1.mlp.down_proj.g_idx").tolist() == [i // 64 for i in range(512)]
    assert "model.layers.0.self_attn.q_proj.weight" not in names and "model.embed_tokens.weight" in names
    # Read back: each weight is the grid's rounding of the original (q/k through HF's row order and back).
    ckpt, back = read_checkpoint(src), read_checkpoint(rtn)
    assert back.config == ckpt.config
    fmt = gptq_format(bits, 64)
    for name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "layers.1.feed_forward.w2.weight"):
        assert torch.equal(back.state_dict[name], fmt.rtn(ckpt.state_dict[name].float())[1]), name
    lm = llamalab.load(gptq)
    x = torch.tensor([lm.tokenizer.encode(calib.read_text()[:400])[:64]])
    with torch.no_grad():
        want = hf(x).logits.float()
        err = {p.name: float(((llamalab.load(p).model(x) - want) ** 2).mean()) for p in (rtn, gptq)}
    assert err["gptq"] < err["rtn"], err


def test_gptq_directory_errors(tiny_hf: tuple[Any, Path, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from llamalab.checkpoint import CheckpointError

    _, src, _ = tiny_hf
    good = tmp_path / "good"
    r = _cli("quantize", str(src), str(good), "--format", "gptq", "--bits", "4", "--group-size", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("quantize", str(src), str(tmp_path / "x"), "--format", "gptq", "--group-size", "96")
    assert r.returncode == 2 and "--group-size 96 does not divide" in r.stderr
    r = _cli("quantize", str(src), str(tmp_path / "x"), "--format", "gptq", "--type", "q4_0")
    assert r.returncode == 2 and "--type is for --format gguf" in r.stderr

    def broken(edit_config: Any = None, edit_tensors: Any = None) -> Path:
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        if edit_config:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg["quantization_config"])
            (d / "config.json").write_text(json.dumps(cfg))
        if edit_tensors:
            sd = load_file(str(d / "model.safetensors"))
            edit_tensors(sd)
            save_file(sd, str(d / "model.safetensors"))
        return d

    cases = [
        (broken(lambda q: q.update(bits=5)), "quantization_config.bits 5"),
        (broken(lambda q: q.update(quant_method="awq")), "quant_method 'awq' is not supported"),
        (broken(edit_tensors=lambda sd: sd.pop("model.layers.0.mlp.up_proj.qzeros")), "up_proj.qzeros missing"),
        (broken(edit_tensors=lambda sd: sd.update({"model.layers.0.mlp.up_proj.scales":
                                                    sd["model.layers.0.mlp.up_proj.scales"][:2]})),
         "up_proj.qzeros has shape"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("(", r"\(")):
            ck = read_checkpoint(path)
            for name in ck.state_dict:
                ck.state_dict[name]
