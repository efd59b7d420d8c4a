"""Writing GGUF (``llamalab convert ... --to gguf``), checked by independent readers: gguf-py's
``GGUFReader``, transformers' GGUF loader (against the original transformers model), gguf-py's
quantizer (the stored blocks), and llama.cpp itself when llama-cpp-python is installed."""

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
from test_checkpoint import (ATOL, TEXT, assert_same_logits, hf_logits, make_hf_model, save_hf, tokens_for,  # noqa: E402
                             train_tokenizer, transformers_gguf)

from test_quant import LLAMA_CPP_LOGITS  # noqa: E402

import llamalab  # noqa: E402
from llamalab.checkpoint import CheckpointError, read_checkpoint, write_checkpoint  # noqa: E402
from llamalab.checkpoint.gguf_write import meta_name_to_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Any:
    return train_tokenizer()


def _hf_dir(tmp_path: Path, tok: Any, variant: str = "llama2-gqa", **overrides: Any) -> tuple[Any, Path]:
    hf = make_hf_model(variant, seed=5, **overrides)
    return hf, save_hf(hf, tmp_path / f"hf-{variant}", tok)


@pytest.mark.parametrize("variant", ["llama2-gqa", "tied", "llama31-scaling"])
def test_f32_round_trip_hf_gguf_llamalab(variant: str, tmp_path: Path, tok: Any) -> None:
    hf, src = _hf_dir(tmp_path, tok, variant)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    n = hf.config.num_hidden_layers
    assert {f"blk.{i}.attn_q.weight" for i in range(n)} <= names and "token_embd.weight" in names
    assert ("output.weight" in names) == (variant != "tied")
    assert ("rope_freqs.weight" in names) == (variant == "llama31-scaling")
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    x = tokens_for(hf.config.vocab_size)
    want = hf_logits(hf, x)
    if variant != "llama31-scaling":  # transformers' GGUF loader reads no rope_freqs
        torch.testing.assert_close(hf_logits(transformers_gguf(out), x), want, atol=ATOL, rtol=1.3e-6)
    lm = llamalab.load(out)
    assert_same_logits(lm.model, want, x)
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT).ids
    src_config = read_checkpoint(src).config
    assert lm.config.norm_eps == pytest.approx(src_config.norm_eps, rel=1e-6)  # GGUF stores it as float32
    assert lm.config.replace(norm_eps=src_config.norm_eps) == src_config


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "f16", "bf16"])
def test_quantized_types_hold_gguf_py_blocks(kind: str, tmp_path: Path, tok: Any) -> None:
    hf, src = _hf_dir(tmp_path, tok, hidden_size=128, intermediate_size=256)
    ckpt = read_checkpoint(src)
    out = write_checkpoint(ckpt, tmp_path / f"m-{kind}.gguf", to="gguf", tensor_type=kind)
    reader = gguf.GGUFReader(out)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    by_name = {t.name: t for t in reader.tensors}
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight"):
        t = by_name[meta_name_to_gguf(name)]
        assert t.tensor_type == qtype
        want = ckpt.state_dict[name].float().numpy()
        want = want.astype(np.float16) if kind == "f16" else gguf.quants.quantize(want, qtype)
        assert np.array_equal(np.asarray(t.data).view(want.dtype).reshape(want.shape), want)
    assert by_name["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    x = tokens_for(hf.config.vocab_size)
    with torch.no_grad():
        ours = llamalab.load(out).model(x)  # dequantized at load
    torch.testing.assert_close(ours, hf_logits(transformers_gguf(out), x), atol=1e-4, rtol=1e-4)


def test_gguf_source_keeps_its_tokenizer_fields(tmp_path: Path) -> None:
    from llamalab.checkpoint.base import CheckpointError as _E
    from llamalab.checkpoint.gguf_header import read_gguf_header
    from llamalab.checkpoint.registry import resolve

    try:
        src = resolve("smollm2-135m-instruct")
    except _E as e:
        pytest.skip(str(e))
    out = write_checkpoint(read_checkpoint(src), tmp_path / "smol-q8_0.gguf", to="gguf", tensor_type="q8_0")
    before = {k: v for k, v in read_gguf_header(src).fields.items() if k.startswith("tokenizer.")}
    after = {k: v for k, v in read_gguf_header(out).fields.items() if k.startswith("tokenizer.")}
    assert after == before
    lm = llamalab.load(out, dtype=None)
    assert lm.model.layers[0].attention.wq.type_name == "Q8_0"
    assert lm.tokenizer.encode("Hello, world") == llamalab.load(src, dtype=None).tokenizer.encode("Hello, world")


def test_refusals(tmp_path: Path, tok: Any) -> None:
    _, src = _hf_dir(tmp_path, tok)
    ckpt = read_checkpoint(src)
    target = tmp_path / "exists.gguf"
    target.write_bytes(b"")
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(ckpt, target, to="gguf")
    with pytest.raises(ValueError, match="expected one of f32, f16"):
        write_checkpoint(ckpt, tmp_path / "x.gguf", to="gguf", tensor_type="q3_x")
    ckpt.tokenizer = None
    with pytest.raises(CheckpointError, match="no tokenizer"):
        write_checkpoint(ckpt, tmp_path / "y.gguf", to="gguf")
    assert not (tmp_path / "y.gguf").exists() and not list(tmp_path.glob(".y.gguf.tmp-*"))


def test_cli_type_only_with_gguf(tmp_path: Path, tok: Any) -> None:
    _, src = _hf_dir(tmp_path, tok)
    run = subprocess.run([sys.executable, "-m", "llamalab.cli", "convert", str(src), str(tmp_path / "o"), "--to", "hf",
                          "--type", "q8_0"], capture_output=True, text=True)
    assert run.returncode == 2 and "only for --to gguf" in run.stderr and "Traceback" not in run.stderr

@pytest.mark.slow
def test_llama_cpp_reads_what_we_write(tmp_path: Path, tok: Any) -> None:
    pytest.importorskip("llama_cpp")
    hf, src = _hf_dir(tmp_path, tok)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    ids = tok.encode(TEXT).ids[:32]
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(out)], input=json.dumps([ids]),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = torch.tensor(json.loads(run.stdout)[0])
    want = hf_logits(hf, torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, want, atol=1e-3, rtol=1e-3)  # llama.cpp's fp32 path, its own order


def _sentencepiece_hf_dir(tmp_path: Path, **options: Any) -> tuple[Any, Path, Any]:
    """An HF dir with a LLaMA-style tokenizer.model: BPE, byte fallback, digits split, no normalization."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT, "hello world, a tiny corpus for sentencepiece 2024", "Zürich café ünïcode"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, minloglevel=2, **({"normalization_rule_name": "identity",
                                                                 "remove_extra_whitespaces": False} | options))
    from test_checkpoint import make_hf_model as _make, save_hf as _save

    hf = _make("llama1-mha", seed=15)
    src = _save(hf, tmp_path / "src")
    import shutil

    shutil.copyfile(tmp_path / "sp.model", src / "tokenizer.model")
    return hf, src, spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def _llama_cpp_tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's tokenization of ``texts`` with the vocabulary of the GGUF at ``path`` (its own process:
    llama.cpp and torch in one process crash)."""
    code = ("import json, sys, llama_cpp\n"
            "llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "print(json.dumps([llm.tokenize(t.encode(), add_bos=False) for t in json.loads(sys.stdin.read())]))\n")
    run = subprocess.run([sys.executable, "-c", code, str(path)], input=json.dumps(texts), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


SP_TEXTS = ["the quick brown fox 123 hello zebra!", "Zürich café ünïcode 2024 — emoji 🦙", "  two  spaces\nnewline"]


def test_sentencepiece_vocabulary_round_trips_through_gguf(tmp_path: Path) -> None:
    """LLaMA 1/2's SentencePiece tokenizer written as llama.cpp's "llama" vocabulary: read back by
    llamalab's GGUF reader and by transformers' GGUF tokenizer loader, both encoding as sentencepiece."""
    hf, src, sp = _sentencepiece_hf_dir(tmp_path)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    reader = gguf.GGUFReader(out)
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert kinds[0] == 2 and kinds[1] == 3 and kinds[2] == 3 and kinds.count(6) == 256  # unk, bos/eos, bytes
    ours = llamalab.load(out).tokenizer
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in SP_TEXTS:
        want = sp.encode(text)
        assert ours.encode(text) == want, text
        if "  " not in text:  # transformers' GGUF converter (a Metaspace pre-tokenizer) splits runs of
            # spaces otherwise than sentencepiece does, whatever the file: not a fact about ours
            assert theirs.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(want) == sp.decode(want)
    x = tokens_for(hf.config.vocab_size)
    assert_same_logits(llamalab.load(out).model, hf_logits(hf, x), x)


def test_sentencepiece_that_normalizes_is_refused(tmp_path: Path) -> None:
    _, src, _ = _sentencepiece_hf_dir(tmp_path, normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)
    with pytest.raises(CheckpointError, match="normalizes text"):
        write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_tokenizes_our_sentencepiece_gguf_as_sentencepiece(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    _, src, sp = _sentencepiece_hf_dir(tmp_path)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    assert _llama_cpp_tokenize(out, SP_TEXTS) == [sp.encode(t) for t in SP_TEXTS]


def _tiktoken_hf_dir(tmp_path: Path) -> tuple[Path, Any]:
    """An HF dir with a Llama 3-style tiktoken tokenizer.model learned here (test_tokenizer's recipe)."""
    import base64

    from test_checkpoint import make_hf_model as _make, save_hf as _save
    from test_tokenizer import LLAMA3_REGEX, gpt2_byte_alphabet, make_corpus
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(make_corpus(seed=3, n_docs=800), trainer=trainer)
    table = gpt2_byte_alphabet()
    singles = sorted((t for t in bpe.get_vocab() if len(t) == 1), key=lambda t: table[t])
    merged = [t for _, t in sorted((i, t) for t, i in bpe.get_vocab().items() if len(t) > 1)]
    lines = [f"{base64.b64encode(bytes(table[c] for c in t)).decode()} {r}" for r, t in enumerate(singles + merged)]
    hf = _make("llama2-gqa", seed=4, vocab_size=len(lines) + 256)
    src = _save(hf, tmp_path / "src")
    (src / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return src, llamalab.load(src).tokenizer


TT_TEXTS = ["The quick brown fox jumps over 1234567 lazy dogs.", "  indented\n\n\ttabs and 'quotes' don't",
            "naïve café — ünïcode ✓"]


def test_tiktoken_vocabulary_round_trips_through_gguf(tmp_path: Path) -> None:
    """Llama 3's tiktoken ranks written as llama.cpp's byte-level "llama-bpe" vocabulary with merges
    derived from the ranks: llamalab's GGUF reader tokenizes as tiktoken itself does."""
    src, tt = _tiktoken_hf_dir(tmp_path)
    assert type(tt).__name__ == "TiktokenTokenizer"
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    reader = gguf.GGUFReader(out)
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama-bpe"
    back = llamalab.load(out).tokenizer
    for text in TT_TEXTS:
        assert back.encode(text) == tt.encode(text), text
    assert back.encode("<|eot_id|>hi", allow_special=True) == tt.encode("<|eot_id|>hi", allow_special=True)
    assert back.bos_id == tt.bos_id and back.eos_id == tt.eos_id


@pytest.mark.slow
def test_llama_cpp_tokenizes_our_tiktoken_gguf_as_tiktoken(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    src, tt = _tiktoken_hf_dir(tmp_path)
    out = write_checkpoint(read_checkpoint(src), tmp_path / "m.gguf", to="gguf", tensor_type="f32")
    assert _llama_cpp_tokenize(out, TT_TEXTS) == [tt.encode(t) for t in TT_TEXTS]
