"""Checkpoint reading and writing, checked against transformers as the independent reference.

Tiny random ``LlamaForCausalLM`` models (LLaMA 1 MHA, Llama 2 GQA, Llama 3 theta, Llama 3.1
RoPE scaling, tied embeddings) are saved by transformers itself and loaded by llamalab; GGUF
files are written here the way llama.cpp's converter writes them and loaded both by llamalab
and by transformers' GGUF loader. Logits must agree to 1e-5 (fp32), for a full forward pass
and for token-by-token decoding with the KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

import llamalab  # noqa: E402
from llamalab.checkpoint import CheckpointError, describe, read_checkpoint, write_checkpoint  # noqa: E402

ATOL = 1e-5
SEQ = 12
TEXT = "the quick brown fox jumps over the lazy dog 12345"

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, initializer_range=0.1)
VARIANTS: dict[str, dict[str, Any]] = {
    "llama1-mha": dict(num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0),
    "llama2-gqa": dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-theta": dict(num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama31-scaling": dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=True),
}


# ---------------------------------------------------------------- helpers shared with the error tests


def make_hf_model(variant: str = "llama2-gqa", seed: int = 0, **overrides: Any) -> Any:
    """A random tiny LlamaForCausalLM; norm weights perturbed so that they matter."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**BASE, **VARIANTS[variant], **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def train_tokenizer(vocab_size: int = 296) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few words: <unk>=0, <s>=1, </s>=2."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return tok


def save_tokenizer_files(tok: Any, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, as a Hugging Face model repository has them."""
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}))


def save_hf(model: Any, folder: Path, tok: Any | None = None, **kwargs: Any) -> Path:
    """``save_pretrained`` plus tokenizer files."""
    model.save_pretrained(folder, **kwargs)
    if tok is not None:
        save_tokenizer_files(tok, folder)
    return folder


def tokens_for(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    """Random token ids."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from feeding one token at a time through the KV cache."""
    bsz, seq = tokens.shape
    model.setup_cache(bsz, seq)
    try:
        steps = [model(tokens[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(seq)]
    finally:
        model.clear_cache()
    return torch.cat(steps, dim=1)


@torch.no_grad()
def assert_same_logits(ours: Any, ref_logits: torch.Tensor, tokens: torch.Tensor, atol: float = ATOL) -> None:
    """Full forward and cached decoding both match the reference logits.

    Beside ``atol``, fp32's own relative rounding (torch's default rtol for float32): logits of
    ~13 differ by ~1e-5 between two correct fp32 paths when the BLAS sums in another order
    (seen on an Intel Xeon with AMX, whose MKL takes another GEMV path); a wrong dequantisation
    or layout is off by 1e-2 or more."""
    full = ours(tokens)
    assert ref_logits.abs().max() > 0.1, "reference logits too small for a meaningful comparison"
    torch.testing.assert_close(full, ref_logits, atol=atol, rtol=1.3e-6)
    torch.testing.assert_close(cached_logits(ours, tokens), ref_logits, atol=atol, rtol=1.3e-6)


@torch.no_grad()
def hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits from a transformers model."""
    return model(tokens).logits.float()


# GGUF writing, as llama.cpp's convert_hf_to_gguf.py does it for LlamaForCausalLM.
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# Byte offsets of the float16 super-block scales in K-quant blocks (ggml's block_qN_K structs).
_K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, i, *rest = hf_name.split(".")
    return f"blk.{i}.{_GGUF_LAYER['.'.join(rest[:-1])]}.weight"


def _hf_to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp undoes HF's rotate_half row order: per head, rows (first half, second half) -> pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_kquant(shape: tuple[int, int], qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant bytes (gguf-py cannot quantize K types): random codes, small fixed scales."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, type_size), dtype=np.uint8)
    for off in _K_SCALES[qtype.name]:
        raw[..., off:off + 2] = np.array([2e-5 if qtype.name == "Q6_K" else 2e-4], np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def gguf_vocab(tok: Any) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, as llama.cpp stores them."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {"<unk>", "<s>", "</s>"}
    types = [3 if t in specials else 1 for t in tokens]  # gguf.TokenType CONTROL / NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, model: Any, qtype: str, tok: Any, *, rope_freqs: np.ndarray | None = None,
               vocab_tokens: int | None = None, tensor_types: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a llama GGUF with weights in ``qtype`` (norms stay F32), plus the tokenizer."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") else {"rope_theta": cfg.rope_theta}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = gguf_vocab(tok)
    extra = (vocab_tokens or cfg.vocab_size) - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(extra)]
    types += [5] * extra  # UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    rng = np.random.default_rng(0)
    tied = "lm_head.weight" not in dict(model.named_parameters()) or cfg.tie_word_embeddings
    for name, t in model.state_dict().items():
        if name not in _GGUF_TOP and ".layers." not in name:
            continue
        if tied and name == "lm_head.weight":
            continue  # llama.cpp writes no output tensor for a tied head
        arr = t.detach().float().numpy().copy()
        if "q_proj" in name:
            arr = _hf_to_interleaved(arr, cfg.num_attention_heads)
        elif "k_proj" in name:
            arr = _hf_to_interleaved(arr, cfg.num_key_value_heads)
        gname = _gguf_name(name)
        kind = (tensor_types or {}).get(gname, qtype)
        q = gguf.GGMLQuantizationType[kind] if isinstance(kind, str) else kind
        if arr.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, arr.astype(np.float32))
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        elif q.name in _K_SCALES:
            w.add_tensor(gname, _random_kquant(arr.shape, q, rng), raw_dtype=q)
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path: Path) -> Any:
    """transformers' own GGUF loader on the same file: the independent reference for GGUF."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok() -> Any:
    """The byte-level BPE tokenizer every test model uses."""
    return train_tokenizer()


# ---------------------------------------------------------------- HF -> llamalab


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_safetensors_matches_transformers(variant: str, tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model(variant)
    src = save_hf(hf, tmp_path / variant, tok)
    lm = llamalab.load(src)
    assert lm.format == "hf" and lm.path == src
    assert lm.config.tie_embeddings == (variant == "tied")
    assert lm.config.n_kv_heads == hf.config.num_key_value_heads
    assert (lm.config.rope_scaling is not None) == (variant == "llama31-scaling")
    assert not lm.model.training
    assert lm.tokenizer.vocab_size == tok.get_vocab_size()
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT).ids
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(lm.model, hf_logits(hf, x), x)


def test_hf_sharded_safetensors(tmp_path: Path) -> None:
    hf = make_hf_model("llama3-theta", seed=3)
    src = save_hf(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*.safetensors"))) > 2
    lm = llamalab.load(src)
    assert lm.tokenizer is None and len(lm.checkpoint_metadata["files"]) > 2
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(lm.model, hf_logits(hf, x), x)


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_pytorch_bin(tmp_path: Path, sharded: bool) -> None:
    """pytorch_model.bin (+ index), as transformers < 4.35 wrote by default."""
    hf = make_hf_model("llama1-mha", seed=4)
    src = tmp_path / "bin"
    hf.config.save_pretrained(src)
    sd = hf.state_dict()
    if not sharded:
        torch.save(sd, src / "pytorch_model.bin")
    else:
        names = list(sd)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        files = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        for part, fname in zip(halves, files):
            torch.save({k: sd[k] for k in part}, src / fname)
        index = {"metadata": {}, "weight_map": {k: f for part, f in zip(halves, files) for k in part}}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    lm = llamalab.load(src)
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(lm.model, hf_logits(hf, x), x)


def test_hf_bfloat16_checkpoint_loads_in_bfloat16_and_float32(tmp_path: Path) -> None:
    hf = make_hf_model("llama2-gqa", seed=5)
    src = save_hf(hf.to(torch.bfloat16), tmp_path / "bf16")
    # transformers' own fp32 load of the bf16 file (casting `hf` back would also round its RoPE buffer).
    hf32 = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x = tokens_for(hf.config.vocab_size)
    lm = llamalab.load(src)
    assert lm.checkpoint_metadata["dtypes"] == {"bfloat16": len(hf.state_dict())}
    assert_same_logits(lm.model, hf_logits(hf32, x), x)
    lm16 = llamalab.load(src, dtype=torch.bfloat16)
    assert lm16.model.tok_embeddings.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- round trips


def test_round_trip_hf_native_meta(tmp_path: Path, tok: Any) -> None:
    """HF -> native -> Meta (2 model-parallel shards) -> load: the logits never change."""
    hf = make_hf_model("llama2-gqa", seed=6)
    src = save_hf(hf, tmp_path / "hf", tok)
    x = tokens_for(hf.config.vocab_size)
    ref = hf_logits(hf, x)

    native = write_checkpoint(read_checkpoint(src), tmp_path / "native", to="native")
    assert (native / "llamalab.json").is_file() and (native / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".native.tmp-*")), "temporary directory left behind"
    lm = llamalab.load(native)
    assert lm.format == "native"
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT).ids
    assert_same_logits(lm.model, ref, x)

    from llamalab.checkpoint import meta

    # An HF tokenizer has no Meta form: it travels as tokenizer.json, with a warning.
    with pytest.warns(UserWarning, match="tokenizer.model"):
        out = write_checkpoint(read_checkpoint(native), tmp_path / "meta", to="meta", n_shards=2)
    assert meta.is_meta_dir(out)
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    lm = llamalab.load(out)
    assert lm.format == "meta"
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT).ids
    assert_same_logits(lm.model, ref, x)


@pytest.mark.parametrize("variant", ["llama31-scaling", "tied"])
def test_round_trip_to_hf_loads_in_transformers(variant: str, tmp_path: Path, tok: Any) -> None:
    """llamalab -> HF directory: transformers loads the same model and the same tokenizer."""
    hf = make_hf_model(variant, seed=7)
    src = save_hf(hf, tmp_path / "src", tok)
    lm = llamalab.load(src)
    out = write_checkpoint(lm, tmp_path / "out", to="hf")
    index_or_file = json.loads((out / "config.json").read_text())
    assert index_or_file["tie_word_embeddings"] == (variant == "tied")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (variant != "tied")
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = tokens_for(hf.config.vocab_size)
    torch.testing.assert_close(hf_logits(back, x), hf_logits(hf, x), atol=ATOL, rtol=0)

    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT).ids
    assert auto.bos_token == "<s>" and auto.eos_token == "</s>"


def test_sentencepiece_tokenizer_round_trips(tmp_path: Path) -> None:
    """A LLaMA 1/2-style tokenizer.model travels HF -> HF (AutoTokenizer reads it) and HF -> Meta."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT, "hello world, a tiny corpus for sentencepiece"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, minloglevel=2)
    hf = make_hf_model("llama1-mha", seed=15)
    src = save_hf(hf, tmp_path / "src")
    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    lm = llamalab.load(src)
    assert type(lm.tokenizer).__name__ == "SentencePieceTokenizer"
    text = "the quick brown fox 123 hello zebra!"
    ids = lm.tokenizer.encode(text, bos=True)

    out = write_checkpoint(lm, tmp_path / "hf", to="hf")
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == ids

    meta = write_checkpoint(read_checkpoint(out), tmp_path / "meta", to="meta")
    assert (meta / "tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
    back = llamalab.load(meta)
    assert back.tokenizer.encode(text, bos=True) == ids
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(back.model, hf_logits(hf, x), x)


def test_write_refuses_existing_destination(tmp_path: Path) -> None:
    hf = make_hf_model("llama2-gqa")
    src = save_hf(hf, tmp_path / "src")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="taken"):
        write_checkpoint(read_checkpoint(src), tmp_path / "taken", to="native")
    assert (tmp_path / "taken" / "file").read_text() == "x"


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_model() -> Any:
    """A model whose rows are multiples of 256, so that K-quant blocks fit."""
    return make_hf_model("llama2-gqa", seed=8, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         num_key_value_heads=2, initializer_range=0.05)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K"])
def test_gguf_matches_transformers_gguf_loader(qtype: str, tmp_path: Path, tok: Any, gguf_model: Any) -> None:
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", gguf_model, qtype, tok)
    lm = llamalab.load(path)
    assert lm.format == "gguf"
    n_matrices = 2 + 7 * gguf_model.config.num_hidden_layers
    assert lm.checkpoint_metadata["quantization"] == (
        {"F32": n_matrices + 1 + 2 * gguf_model.config.num_hidden_layers} if qtype == "F32"
        else {qtype: n_matrices, "F32": 1 + 2 * gguf_model.config.num_hidden_layers})
    ref = transformers_gguf(path)
    x = tokens_for(gguf_model.config.vocab_size)
    assert_same_logits(lm.model, hf_logits(ref, x), x)
    if qtype == "F32":
        # Unquantized, the file is the original model: GGUF's q/k layout really is Meta's.
        assert_same_logits(lm.model, hf_logits(gguf_model, x), x)


def test_gguf_tied_embeddings_and_tokenizer(tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model("tied", seed=9)
    path = write_gguf(tmp_path / "tied.gguf", hf, "F32", tok)
    lm = llamalab.load(path)
    assert lm.config.tie_embeddings
    assert lm.model.output.weight is lm.model.tok_embeddings.weight
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(lm.model, hf_logits(hf, x), x)
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT).ids
    assert lm.tokenizer.bos_id == 1 and lm.tokenizer.eos_id == 2 and lm.tokenizer.chat_template

    # GGUF -> HF: the rebuilt tokenizer is saved as tokenizer.json that transformers reads.
    out = write_checkpoint(read_checkpoint(path), tmp_path / "hf", to="hf")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT).ids
    assert auto.chat_template == lm.tokenizer.chat_template
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(back, x), hf_logits(hf, x), atol=ATOL, rtol=0)


def _llama31_rope_freqs(hf: Any) -> np.ndarray:
    """rope_freqs as llama.cpp stores it: default frequency / scaled frequency, from transformers' rope code."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = hf.model.rotary_emb
    scaled = rotary.inv_freq.double()
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    theta = float(hf.config.rope_parameters["rope_theta"])
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    assert "llama3" in ROPE_INIT_FUNCTIONS  # the scaled frequencies above come from that function
    return (default / scaled).float().numpy()


def test_gguf_rope_freqs_become_llama31_scaling(tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model("llama31-scaling", seed=10, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, rope_theta=500000.0, max_position_embeddings=16384)
    factors = _llama31_rope_freqs(hf)
    assert factors.max() > 1.5 and factors.min() == pytest.approx(1.0), "test model must exercise the scaling"
    path = write_gguf(tmp_path / "l31.gguf", hf, "F32", tok, rope_freqs=factors)
    lm = llamalab.load(path)
    assert lm.config.rope_scaling is not None and lm.config.rope_scaling.factor == 8.0
    x = tokens_for(hf.config.vocab_size, seq=48)
    ref = hf_logits(hf, x)
    assert_same_logits(lm.model, ref, x)
    # The scaling must matter at these positions, or the comparison above proves nothing.
    unscaled = llamalab.checkpoint.build_model(dataclasses.replace(
        read_checkpoint(path), config=lm.config.replace(rope_scaling=None)))
    with torch.no_grad():
        assert (unscaled(x) - ref).abs().max() > 100 * ATOL


# ---------------------------------------------------------------- describe


def test_describe_hf_and_gguf(tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model("tied", seed=11)
    src = save_hf(hf, tmp_path / "hf", tok)
    info = describe(src)
    assert info["format"] == "hf"
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["config"]["dim"] == 64 and info["config"]["tie_embeddings"] is True
    assert info["tensor_types"] == {"float32": len(hf.state_dict()) - 1}  # no lm_head saved
    assert info["tokenizer"]["vocab_size"] == tok.get_vocab_size()
    assert info["memory_bytes"]["float32"] == 4 * info["parameters"]

    path = write_gguf(tmp_path / "q.gguf", make_hf_model("llama2-gqa", seed=12), "Q8_0", tok)
    info = describe(path)
    assert info["format"] == "gguf" and info["name"] == "tiny-test"
    assert info["tensor_types"]["Q8_0"] == 2 + 7 * 2
    assert info["tokenizer"]["chat_template"] is True


def test_registered_name_or_directory_with_one_gguf(tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model("llama2-gqa", seed=13)
    folder = tmp_path / "dir"
    folder.mkdir()
    write_gguf(folder / "only.gguf", hf, "F32", tok)
    ckpt = read_checkpoint(folder)
    assert ckpt.format == "gguf" and ckpt.path == folder / "only.gguf"
    assert "smollm2-135m-instruct" in llamalab.checkpoint.registered_names()


def test_native_round_trip_keeps_dtype_and_shards(tmp_path: Path, tok: Any) -> None:
    hf = make_hf_model("tied", seed=14)
    src = save_hf(hf, tmp_path / "hf", tok)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "native", to="native", dtype=torch.bfloat16,
                           max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    lm = llamalab.load(out)
    assert lm.config.tie_embeddings
    ref = llamalab.load(src, dtype=torch.bfloat16)
    x = tokens_for(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), ref.model.float()(x), atol=ATOL, rtol=0)
    shutil.rmtree(out)
