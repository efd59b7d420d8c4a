"""Meta's consolidated.NN.pth layout: write, read back, and the model-parallel split.

The references are independent of the code under test: a random HF ``LlamaForCausalLM``
gives the logits every round trip must reproduce, and a small re-statement of Meta's
model-parallel forward pass (each rank computes with its own shard files, loaded with
plain ``torch.load``; column-parallel outputs are gathered, row-parallel partial sums
added) checks that the shards hold what Meta's fairscale layers expect.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from llamalab.checkpoint.base import CheckpointError, build_model  # noqa: E402
from llamalab.checkpoint.convert import config_to_hf, hf_state_dict_to_meta  # noqa: E402
from llamalab.checkpoint.meta import ShardedStateDict, is_meta_dir, read_meta, write_meta  # noqa: E402
from llamalab.config import ModelConfig  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)

VARIANTS = {
    # LLaMA 1/2 multi-head attention.
    "mha": ModelConfig(dim=64, n_layers=2, n_heads=8, vocab_size=128, multiple_of=32, norm_eps=1e-6,
                       max_seq_len=64),
    # Llama 2 70B-style grouped-query attention with an FFN multiplier.
    "gqa": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, multiple_of=32,
                       ffn_dim_multiplier=1.3, max_seq_len=64),
    # Llama 3: theta 500k, GQA, and (when written so) a vocabulary-parallel embedding.
    "llama3": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, multiple_of=64,
                          rope_theta=500000.0, max_seq_len=64),
    # SmolLM2-style tied embeddings with an explicit FFN width.
    "tied": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                        rope_theta=100000.0, max_seq_len=64, tie_embeddings=True),
}

# Fields of Meta's ModelArgs (facebookresearch/llama model.py, meta-llama/llama3 model.py) that
# params.json may set; max_seq_len and max_batch_size are passed by build() and must not be there.
LLAMA2_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps"}
LLAMA3_ARGS = LLAMA2_ARGS | {"rope_theta", "use_scaled_rope"}


@functools.lru_cache(maxsize=None)
def hf_model(name: str) -> torch.nn.Module:
    """A random HF LlamaForCausalLM for a variant (weights larger than init so errors show)."""
    config = VARIANTS[name]
    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type",
                                                                           "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    return hf


def meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    return hf_state_dict_to_meta(hf_model(name).state_dict(), VARIANTS[name])


def hf_logits(name: str, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(name)(tokens).logits


def tokens_for(config: ModelConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))


def meta_mp_forward(folder: Path, tokens: torch.Tensor, *, vocab_parallel: bool) -> torch.Tensor:
    """Meta's model.py forward pass run rank by rank over the shard files, the collectives done by hand."""
    params = json.loads((folder / "params.json").read_text())
    files = sorted(folder.glob("consolidated.*.pth"))
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    dim, n_heads = params["dim"], params["n_heads"]
    hd, eps = dim // n_heads, params["norm_eps"]
    theta = params.get("rope_theta", 10000.0)
    bsz, seqlen = tokens.shape
    # precompute_freqs_cis / apply_rotary_emb as Meta writes them: complex multiplication.
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    freqs_cis = torch.polar(torch.ones(seqlen, hd // 2, dtype=torch.float64),
                            torch.outer(torch.arange(seqlen, dtype=torch.float64), freqs)).to(torch.complex64)

    def rope(x: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    if vocab_parallel:  # VocabParallelEmbedding: each rank embeds its vocabulary range, then all-reduce
        h = 0
        for rank, sd in enumerate(shards):
            local = sd["tok_embeddings.weight"]
            start = rank * local.shape[0]
            inside = (tokens >= start) & (tokens < start + local.shape[0])
            h = h + F.embedding((tokens - start).clamp(0, local.shape[0] - 1), local) * inside[..., None]
    else:  # ParallelEmbedding: each rank embeds a slice of the features, then all-gather
        h = torch.cat([F.embedding(tokens, sd["tok_embeddings.weight"]) for sd in shards], dim=-1)
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, shards[0][p + "attention_norm.weight"])
        attn_out = 0
        for sd in shards:  # each rank: its local heads, then wo's partial sum (RowParallelLinear)
            q = (x @ sd[p + "attention.wq.weight"].T).view(bsz, seqlen, -1, hd)
            k = (x @ sd[p + "attention.wk.weight"].T).view(bsz, seqlen, -1, hd)
            v = (x @ sd[p + "attention.wv.weight"].T).view(bsz, seqlen, -1, hd)
            q, k = rope(q), rope(k)
            rep = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
            out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(bsz, seqlen, -1)
            attn_out = attn_out + out @ sd[p + "attention.wo.weight"].T
        h = h + attn_out
        x = norm(h, shards[0][p + "ffn_norm.weight"])
        h = h + sum((F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
                    @ sd[p + "feed_forward.w2.weight"].T for sd in shards)
    h = norm(h, shards[0]["norm.weight"])
    return torch.cat([h @ sd["output.weight"].T for sd in shards], dim=-1)  # ColumnParallelLinear, gathered


ROUND_TRIPS = [(v, n) for v in ("mha", "gqa", "llama3") for n in (1, 2, 4)] + [("tied", 1), ("tied", 2)]


@pytest.mark.parametrize("variant,n_shards", ROUND_TRIPS)
def test_round_trip_matches_hf(tmp_path: Path, variant: str, n_shards: int) -> None:
    config = VARIANTS[variant]
    vocab_parallel = variant == "llama3"
    sd = meta_state_dict(variant)
    if config.tie_embeddings:
        sd.pop("output.weight")  # the writer must supply Meta's untied head itself
    dst = write_meta(config, sd, tmp_path / "ckpt", n_shards=n_shards, vocab_parallel_embedding=vocab_parallel)
    assert is_meta_dir(dst)
    tokens = tokens_for(config)
    ref = hf_logits(variant, tokens)

    # The files, run the way Meta's model-parallel code runs them.
    torch.testing.assert_close(meta_mp_forward(dst, tokens, vocab_parallel=vocab_parallel), ref, **TOL)

    ckpt = read_meta(dst)
    assert isinstance(ckpt.state_dict, ShardedStateDict)
    assert ckpt.metadata["n_shards"] == n_shards and ckpt.metadata["checksums"] == "verified"
    if n_shards > 1:
        assert ckpt.metadata["embedding_split"] == ("vocab" if vocab_parallel else "dim")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta"):
        assert getattr(ckpt.config, field) == getattr(config, field), field
    assert ckpt.config.ffn_hidden_dim == config.ffn_hidden_dim
    model = build_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, **TOL)


@pytest.mark.parametrize("variant", ["gqa", "llama3"])
def test_two_shard_layout(tmp_path: Path, variant: str) -> None:
    """Per-shard shapes are those of Meta's model.py with model_parallel_size=2."""
    config = VARIANTS[variant]
    vocab_parallel = variant == "llama3"
    dst = write_meta(config, meta_state_dict(variant), tmp_path / "ckpt", n_shards=2,
                     vocab_parallel_embedding=vocab_parallel)
    assert sorted(p.name for p in dst.iterdir()) == ["checklist.chk", "consolidated.00.pth",
                                                     "consolidated.01.pth", "params.json"]
    dim, vocab, hidden = config.dim, config.vocab_size, config.ffn_hidden_dim
    kv = config.n_kv_heads * config.head_dim
    for f in ("consolidated.00.pth", "consolidated.01.pth"):
        sd = torch.load(dst / f, map_location="cpu", weights_only=True)
        assert tuple(sd["layers.0.attention.wq.weight"].shape) == (dim // 2, dim)
        assert tuple(sd["layers.0.attention.wk.weight"].shape) == (kv // 2, dim)
        assert tuple(sd["layers.0.attention.wv.weight"].shape) == (kv // 2, dim)
        assert tuple(sd["layers.0.attention.wo.weight"].shape) == (dim, dim // 2)
        assert tuple(sd["layers.1.feed_forward.w1.weight"].shape) == (hidden // 2, dim)
        assert tuple(sd["layers.1.feed_forward.w3.weight"].shape) == (hidden // 2, dim)
        assert tuple(sd["layers.1.feed_forward.w2.weight"].shape) == (dim, hidden // 2)
        assert tuple(sd["output.weight"].shape) == (vocab // 2, dim)
        want_emb = (vocab // 2, dim) if vocab_parallel else (vocab, dim // 2)
        assert tuple(sd["tok_embeddings.weight"].shape) == want_emb
        for norm in ("norm.weight", "layers.0.attention_norm.weight", "layers.1.ffn_norm.weight"):
            assert tuple(sd[norm].shape) == (dim,)
        # Each tensor owns a compact storage (torch.save would otherwise store whole parents).
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in sd.values())
    # Rank 1 holds the second half of the rows of wq, and of the columns of wo.
    full = meta_state_dict(variant)
    sd1 = torch.load(dst / "consolidated.01.pth", map_location="cpu", weights_only=True)
    torch.testing.assert_close(sd1["layers.0.attention.wq.weight"], full["layers.0.attention.wq.weight"][dim // 2:])
    torch.testing.assert_close(sd1["layers.0.attention.wo.weight"], full["layers.0.attention.wo.weight"][:, dim // 2:])

    params = json.loads((dst / "params.json").read_text())
    assert set(params) <= (LLAMA3_ARGS if vocab_parallel else LLAMA2_ARGS)
    for line in (dst / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.md5((dst / name).read_bytes()).hexdigest() == digest


def test_dtype_argument_and_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = VARIANTS["gqa"]
    sd = meta_state_dict("gqa")
    dst = write_meta(config, sd, tmp_path / "bf16", n_shards=2, dtype=torch.bfloat16)
    shard = torch.load(dst / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="already exists"):
        write_meta(config, sd, dst)
    write_meta(config, sd, dst, overwrite=True)  # replaced: fp32 now
    assert read_meta(dst).metadata["dtypes"] == ["float32"]

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_meta(config, sd, tmp_path / "never", n_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no half-written folder left behind


def test_tokenizer_in_parent_supplies_vocab_size(tmp_path: Path) -> None:
    """LLaMA 1 layout: <root>/tokenizer.model, <root>/7B/params.json with vocab_size -1."""
    words = "the quick brown fox jumps over a lazy dog while llamas graze high in the andes".split()
    rng = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=rng)) for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    try:
        from llamalab.tokenizer import train_sentencepiece

        tok_file = train_sentencepiece([tmp_path / "corpus.txt"], tmp_path / "sp", vocab_size=300)
    except ImportError:
        import sentencepiece as spm

        spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                       vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
        tok_file = tmp_path / "sp.model"
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_file)).get_piece_size()
    root = tmp_path / "LLaMA"
    root.mkdir()
    shutil.copyfile(tok_file, root / "tokenizer.model")
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=vocab, multiple_of=32, norm_eps=1e-6)
    torch.manual_seed(0)
    sd = {k: torch.randn(s) for k, s in _shapes(config).items()}
    dst = write_meta(config, sd, root / "7B", n_shards=2)
    params = json.loads((dst / "params.json").read_text())
    params["vocab_size"] = -1
    (dst / "params.json").write_text(json.dumps(params))
    (dst / "checklist.chk").unlink()  # params.json changed; an absent checklist is not checked

    ckpt = read_meta(dst)
    assert ckpt.config.vocab_size == vocab
    assert ckpt.metadata["tokenizer_path"] == str(root / "tokenizer.model")
    assert ckpt.metadata["checksums"] == "absent"
    assert ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size == vocab
    model = build_model(ckpt)
    torch.testing.assert_close(model.tok_embeddings.weight, sd["tok_embeddings.weight"], rtol=0, atol=0)


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from llamalab.checkpoint.base import expected_shapes

    return expected_shapes(config)


# ---------------------------------------------------------------- errors


@pytest.fixture
def four_shards(tmp_path: Path) -> Path:
    return write_meta(VARIANTS["gqa"], meta_state_dict("gqa"), tmp_path / "ckpt", n_shards=4)


def test_md5_mismatch_names_file_and_digests(four_shards: Path) -> None:
    chk = four_shards / "checklist.chk"
    lines = chk.read_text().splitlines()
    digest, name = lines[2].split("  ")
    bad = "0" * 32
    lines[2] = f"{bad}  {name}"
    chk.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=rf"{name}: md5 checksum is {digest}, expected {bad}"):
        read_meta(four_shards)
    assert read_meta(four_shards, verify_checksums=False).metadata["checksums"] == "skipped"


def test_missing_middle_shard(four_shards: Path) -> None:
    (four_shards / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"not consolidated\.01\.pth; expected 4 shards"):
        read_meta(four_shards, verify_checksums=False)


def test_missing_last_shard_is_caught_by_shapes(four_shards: Path) -> None:
    (four_shards / "consolidated.03.pth").unlink()
    (four_shards / "checklist.chk").unlink()
    with pytest.raises(CheckpointError, match=r"imply 4 model-parallel shard\(s\).*3 shard file\(s\)"):
        read_meta(four_shards)


def test_no_shards_and_missing_params(tmp_path: Path, four_shards: Path) -> None:
    (four_shards / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"params\.json: missing"):
        read_meta(four_shards)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 8, "vocab_size": 128}))
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth shard files"):
        read_meta(empty)
    assert not is_meta_dir(empty)


def test_truncated_shard(four_shards: Path) -> None:
    f = four_shards / "consolidated.02.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: md5 checksum"):
        read_meta(four_shards)
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: cannot be read.*truncated or corrupt"):
        read_meta(four_shards, verify_checksums=False)


def test_wrong_shape_and_missing_tensor(four_shards: Path) -> None:
    f = four_shards / "consolidated.01.pth"
    sd = torch.load(f, map_location="cpu", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor layers\.1\.feed_forward\.w2\.weight "
                                              r"has shape \[64, \d+\], expected \[64, \d+\]"):
        read_meta(four_shards, verify_checksums=False)
    del sd["layers.1.feed_forward.w2.weight"]
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: missing tensor\(s\) "
                                              r"layers\.1\.feed_forward\.w2\.weight"):
        read_meta(four_shards, verify_checksums=False)


def test_replicated_norms_must_agree(four_shards: Path) -> None:
    f = four_shards / "consolidated.03.pth"
    sd = torch.load(f, map_location="cpu", weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"consolidated\.03\.pth: replicated tensor norm\.weight differs"):
        read_meta(four_shards, verify_checksums=False)


def test_writer_refuses_unsplittable(tmp_path: Path) -> None:
    config = VARIANTS["gqa"]  # 4 KV heads cannot be spread over 8 ranks
    with pytest.raises(CheckpointError, match=r"n_kv_heads=4 not divisible by 8"):
        write_meta(config, meta_state_dict("gqa"), tmp_path / "x", n_shards=8)
    assert not (tmp_path / "x").exists()


def test_lazy_state_dict_reads_nothing_for_shapes(four_shards: Path) -> None:
    ckpt = read_meta(four_shards)
    sd = ckpt.state_dict
    assert "norm.weight" in sd and "rope.freqs" not in sd
    assert sd.shapes()["layers.0.attention.wo.weight"] == (64, 64)
    merged = sd["layers.0.attention.wo.weight"]
    torch.testing.assert_close(merged, meta_state_dict("gqa")["layers.0.attention.wo.weight"], rtol=0, atol=0)
    assert os.fspath(ckpt.path) == os.fspath(four_shards)
