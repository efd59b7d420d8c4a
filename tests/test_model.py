"""The model against HF transformers' LlamaForCausalLM (an independent implementation).

Tiny random configs of every LLaMA variant; logits must agree to 1e-5 (fp32) for the full
forward pass, for token-by-token decoding through the KV cache, for per-row cache
positions, and for the Llama 3 document mask.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llamalab.checkpoint.convert import config_to_hf, hf_state_dict_to_meta  # noqa: E402
from llamalab.config import ModelConfig, RopeScaling  # noqa: E402
from llamalab.model import RMSNorm, Transformer, apply_rotary_emb, precompute_rope, rope_frequencies  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)

VARIANTS = {
    # LLaMA 1: multi-head attention, theta 1e4, eps 1e-6.
    "llama1-mha": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, norm_eps=1e-6,
                              max_seq_len=64),
    # Llama 2 70B-style grouped-query attention.
    "llama2-gqa": ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, multiple_of=32,
                              ffn_dim_multiplier=1.3, max_seq_len=64),
    # Llama 3: theta 500k, GQA.
    "llama3": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=64,
                          rope_theta=500000.0, max_seq_len=64),
    # Llama 3.1 frequency scaling, with a short "original context" so every band is exercised.
    "llama3.1-scaled": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=64,
                                   rope_theta=500000.0, max_seq_len=64,
                                   rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                            high_freq_factor=4.0, original_max_seq_len=16)),
    # SmolLM2-style: tied embeddings, explicit hidden_dim.
    "tied": ModelConfig(dim=48, n_layers=3, n_heads=3, n_kv_heads=1, vocab_size=96, hidden_dim=80,
                        rope_theta=100000.0, max_seq_len=64, tie_embeddings=True),
}


def hf_pair(config: ModelConfig, seed: int = 0) -> tuple[torch.nn.Module, Transformer]:
    """A random HF LlamaForCausalLM and our Transformer holding the same weights."""
    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type",
                                                                           "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)  # larger than init so that differences would show
    ours = Transformer(config).eval()
    ours.load_state_dict(hf_state_dict_to_meta(hf.state_dict(), config), strict=True)
    return hf, ours


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_forward_matches_hf(name: str) -> None:
    config = VARIANTS[name]
    hf, ours = hf_pair(config)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, **TOL)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kv_cache_decoding_matches_hf(name: str) -> None:
    config = VARIANTS[name]
    hf, ours = hf_pair(config, seed=1)
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours.setup_cache(max_batch_size=2, max_seq_len=config.max_seq_len)
        prefill = ours(tokens[:, :7], input_pos=torch.arange(7))
        steps = [ours(tokens[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(7, 40)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), ref, **TOL)


def test_per_row_cache_positions() -> None:
    """Rows at different positions in one batch (ragged prompts) equal each row decoded alone."""
    config = VARIANTS["llama2-gqa"]
    hf, ours = hf_pair(config, seed=2)
    a = torch.randint(0, config.vocab_size, (1, 12))
    b = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        ref_a, ref_b = hf(a).logits, hf(b).logits
        ours.setup_cache(max_batch_size=2, max_seq_len=32)
        # Prefill both rows with their first 5 tokens, then advance them at their own positions.
        ours(torch.cat([a[:, :5], b[:, :5]]), input_pos=torch.arange(5))
        out_a, out_b = [], []
        pos = torch.tensor([[5], [5]])
        for step in range(4):  # row b runs out after 9 tokens; keep both going in lockstep for 4 steps
            toks = torch.cat([a[:, 5 + step:6 + step], b[:, 5 + step:6 + step]])
            logits = ours(toks, input_pos=pos + step)
            out_a.append(logits[0:1])
            out_b.append(logits[1:2])
        # Now only row a advances; row b's slot is re-fed at its last position (its result is ignored).
        for step in range(4, 7):
            toks = torch.cat([a[:, 5 + step:6 + step], b[:, 8:9]])
            logits = ours(toks, input_pos=torch.tensor([[5 + step], [8]]))
            out_a.append(logits[0:1])
    torch.testing.assert_close(torch.cat(out_a, 1), ref_a[:, 5:12], **TOL)
    torch.testing.assert_close(torch.cat(out_b, 1), ref_b[:, 5:9], **TOL)


def test_document_mask_isolates_packed_documents() -> None:
    """With doc_ids, each packed document equals HF on that document alone at the same positions."""
    config = VARIANTS["llama3"]
    hf, ours = hf_pair(config, seed=3)
    lengths = [5, 11, 8]
    tokens = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        packed = ours(tokens, doc_ids=doc_ids)
        start = 0
        for n in lengths:
            pos = torch.arange(start, start + n).unsqueeze(0)
            ref = hf(tokens[:, start:start + n], position_ids=pos).logits
            torch.testing.assert_close(packed[:, start:start + n], ref, **TOL)
            start += n
        # Without the mask, later documents do see earlier ones: the mask is doing something.
        plain = ours(tokens)
        assert (plain[:, 5:] - packed[:, 5:]).abs().max() > 1e-3


def test_rmsnorm_formula() -> None:
    x = torch.randn(3, 7, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_is_a_rotation_of_adjacent_pairs() -> None:
    """Hand-computed: pair (x0, x1) at position p rotates by angle p * theta^(-2i/d)."""
    head_dim, theta = 8, 10000.0
    rope = precompute_rope(head_dim, 16, theta)
    x = torch.randn(1, 16, 1, head_dim)
    out = apply_rotary_emb(x, rope.unsqueeze(0))
    p, i = 7, 2
    angle = p * theta ** (-2 * i / head_dim)
    x0, x1 = x[0, p, 0, 2 * i], x[0, p, 0, 2 * i + 1]
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    torch.testing.assert_close(out[0, p, 0, 2 * i], x0 * c - x1 * s)
    torch.testing.assert_close(out[0, p, 0, 2 * i + 1], x0 * s + x1 * c)
    # Norms are preserved (a rotation).
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_llama31_scaling_matches_hf_inv_freq() -> None:
    """The 3.1 frequency scaling equals transformers' 'llama3' rope initialisation."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling()
    hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                      max_position_embeddings=131072,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_frequencies(128, 500000.0, scaling), inv_freq.float(), rtol=1e-6, atol=0)


def test_cache_requires_positions_and_bounds() -> None:
    config = VARIANTS["llama1-mha"]
    model = Transformer(config)
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(1, config.max_seq_len + 1)
