"""Translations at the border: other layouts' names, configs and rotary permutation <-> Meta's.

Inside llamalab every state dict uses Meta's names and Meta's rotary layout (adjacent
feature pairs). HF checkpoints name weights differently and permute the rows of
``wq``/``wk`` so that their ``rotate_half`` (first half / second half) rotation gives
the same result; GGUF files keep Meta's layout under llama.cpp's names. This module
is the only place that knows either.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import Tensor

from llamalab.config import ModelConfig, RopeScaling

# Meta name pattern -> HF name pattern (per layer names use {i}).
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_TOP = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}


def _name_map(top: dict[str, str], layer: dict[str, str], layer_prefix: str) -> Callable[[str], str | None]:
    """A function from a foreign name to Meta's name (None for names that are not weights)."""
    inv_top = {v: k for k, v in top.items()}
    inv_layer = {v: k for k, v in layer.items()}
    pat = re.compile(re.escape(layer_prefix) + r"(\d+)\.(.+)$")

    def to_meta(name: str) -> str | None:
        if name in inv_top:
            return inv_top[name]
        m = pat.match(name)
        if m and m.group(2) in inv_layer:
            return f"layers.{m.group(1)}.{inv_layer[m.group(2)]}"
        return None

    return to_meta


hf_name_to_meta = _name_map(_HF_TOP, _HF_LAYER, "model.layers.")
gguf_name_to_meta = _name_map(_GGUF_TOP, _GGUF_LAYER, "blk.")


def meta_name_to_hf(name: str) -> str:
    """Meta weight name -> HF ``LlamaForCausalLM`` name."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _HF_LAYER:
        return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    raise KeyError(f"not a LLaMA weight name: {name!r}")


def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved-pair rows of a q/k projection -> HF's half-split rows (per head)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: Tensor, n_heads: int) -> Tensor:
    """HF's half-split rows of a q/k projection -> Meta's interleaved pairs (inverse of :func:`permute_to_hf`)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _heads_for(meta_name: str, config: ModelConfig) -> int | None:
    if meta_name.endswith("attention.wq.weight"):
        return config.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def hf_to_meta_tensor(hf_name: str, w: Tensor, config: ModelConfig) -> tuple[str, Tensor] | None:
    """One HF tensor -> (Meta name, tensor in Meta layout); None for non-weight entries."""
    name = hf_name_to_meta(hf_name)
    if name is None:
        return None
    heads = _heads_for(name, config)
    return name, (permute_from_hf(w, heads) if heads else w)


def meta_to_hf_tensor(name: str, w: Tensor, config: ModelConfig) -> tuple[str, Tensor]:
    """One Meta tensor -> (HF name, tensor in HF layout)."""
    heads = _heads_for(name, config)
    return meta_name_to_hf(name), (permute_to_hf(w, heads) if heads else w)


def hf_state_dict_to_meta(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A whole HF state dict -> Meta names and layout (``rotary_emb`` buffers and the like are dropped)."""
    out = {}
    for k, v in sd.items():
        item = hf_to_meta_tensor(k, v, config)
        if item is not None:
            out[item[0]] = item[1]
    if config.tie_embeddings and "tok_embeddings.weight" in out:
        # Tied checkpoints usually omit the head; our state dict names both (they share storage).
        out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def meta_state_dict_to_hf(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A whole Meta state dict -> HF names and layout (tied output weight omitted)."""
    out = {}
    for k, v in sd.items():
        if config.tie_embeddings and k == "output.weight":
            continue
        name, t = meta_to_hf_tensor(k, v, config)
        out[name] = t
    return out


# ---------------------------------------------------------------- configs


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """HF ``config.json`` (LlamaConfig) -> ModelConfig."""
    rs = cfg.get("rope_scaling") or None
    if rs is None and isinstance(cfg.get("rope_parameters"), dict):
        rp = cfg["rope_parameters"]  # transformers >= 5 nests theta and scaling here
        rs = rp if rp.get("rope_type", "default") != "default" else None
        cfg = {**cfg, "rope_theta": rp.get("rope_theta", cfg.get("rope_theta", 10000.0))}
    scaling = None
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (expected 'llama3')")
        scaling = RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                              high_freq_factor=float(rs["high_freq_factor"]),
                              original_max_seq_len=int(rs["original_max_position_embeddings"]))
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // n_heads:
        raise ValueError(f"config.json: head_dim={head_dim} != hidden_size/num_attention_heads")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"config.json: {flag}=true is not a LLaMA architecture (expected false)")
    return ModelConfig(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: ModelConfig, *, bos_id: int | None = None, eos_id: int | None = None,
                 torch_dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> HF ``config.json`` for ``LlamaForCausalLM``."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_hidden_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": torch_dtype,
        "rope_scaling": None,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_seq_len}
    if bos_id is not None:
        out["bos_token_id"] = bos_id
    if eos_id is not None:
        out["eos_token_id"] = eos_id
    return out


def config_from_meta_params(params: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """Meta ``params.json`` -> ModelConfig (LLaMA 1 files say ``vocab_size: -1``: pass the tokenizer's)."""
    vs = params.get("vocab_size", -1)
    if vs is None or vs <= 0:
        if vocab_size is None:
            raise ValueError("params.json: vocab_size is -1 and no tokenizer was found to supply it")
        vs = vocab_size
    scaling = RopeScaling() if params.get("use_scaled_rope") else None
    return ModelConfig(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vs, multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(params.get("max_seq_len", 2048 if vs == 32000 else 8192)),
    )


def config_to_meta_params(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> Meta ``params.json``, written the way Meta's releases write it.

    Meta's code builds ``ModelArgs(max_seq_len=..., max_batch_size=..., **params)``, so the
    file holds only keys its ``ModelArgs`` knows and omits those at their defaults: no
    ``max_seq_len`` (a duplicate keyword there), ``n_kv_heads`` only for GQA and
    ``ffn_dim_multiplier`` only when set (LLaMA 1's ``ModelArgs`` has neither), ``rope_theta``
    only when it is not 1e4 (Llama 2's has none; Llama 3 releases always state theirs).
    The SwiGLU width is derived from ``multiple_of`` and ``ffn_dim_multiplier``; a config
    with an explicit ``hidden_dim`` that the rule cannot reproduce is refused.
    """
    probe = ModelConfig(dim=config.dim, n_layers=1, n_heads=config.n_heads, multiple_of=config.multiple_of,
                        ffn_dim_multiplier=config.ffn_dim_multiplier)
    multiple_of, multiplier = config.multiple_of, config.ffn_dim_multiplier
    if probe.ffn_hidden_dim != config.ffn_hidden_dim:
        rule = find_meta_ffn_rule(config.dim, config.ffn_hidden_dim)
        if rule is None:
            raise ValueError(f"hidden_dim={config.ffn_hidden_dim} cannot be expressed with Meta's "
                             f"multiple_of/ffn_dim_multiplier rule for dim={config.dim}")
        multiple_of, multiplier = rule
    params: dict[str, Any] = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.n_kv_heads != config.n_heads:
        params["n_kv_heads"] = config.n_kv_heads
    params["vocab_size"] = config.vocab_size
    params["multiple_of"] = multiple_of
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = config.norm_eps
    if config.rope_theta != 10000.0:
        params["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        if config.rope_scaling != RopeScaling():
            raise ValueError("Meta params.json can only express the default Llama 3.1 RoPE scaling")
        params["use_scaled_rope"] = True
    return params


def find_meta_ffn_rule(dim: int, hidden_dim: int) -> tuple[int, float | None] | None:
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give ``hidden_dim``, if any.

    With ``multiple_of = hidden_dim`` the rule rounds any width in (0, hidden_dim] up to
    exactly ``hidden_dim``, so only a multiplier that shrinks the base width is needed.
    """
    base = int(2 * (4 * dim) / 3)
    mult = None if base <= hidden_dim else hidden_dim / base
    width = base if mult is None else int(mult * base)
    return (hidden_dim, mult) if 0 < width <= hidden_dim else None


def config_from_gguf(fields: dict[str, Any]) -> ModelConfig:
    """GGUF ``llama.*`` metadata (decoded values) -> ModelConfig."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; expected 'llama'")

    def get(key: str, default: Any = None) -> Any:
        v = fields.get(f"llama.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata: missing llama.{key}")
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    vocab = fields.get("llama.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    scaling = None
    if fields.get("llama.rope.scaling.type") in ("yarn", "linear"):
        raise ValueError(f"GGUF metadata: rope scaling type {fields['llama.rope.scaling.type']!r} is not supported")
    return ModelConfig(
        dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(fields.get("llama.attention.head_count_kv") or n_heads), vocab_size=int(vocab),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(fields.get("llama.rope.freq_base") or 10000.0), rope_scaling=scaling,
        max_seq_len=int(get("context_length", 2048)), tie_embeddings=False,
    )


def gguf_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> Tensor:
    """llama.cpp's ``rope_freqs.weight`` for a Llama 3.1-style scaling: each pair's frequency divisor."""
    from llamalab.model import rope_frequencies

    base = rope_frequencies(head_dim, theta).double()
    return (base / rope_frequencies(head_dim, theta, scaling).double()).float()


def rope_scaling_from_gguf_factors(factors: Tensor, head_dim: int, theta: float,
                                   original_max_seq_len: int = 8192) -> RopeScaling | None:
    """The RopeScaling that a GGUF ``rope_freqs.weight`` tensor stands for (None when every divisor is 1).

    The divisors do not determine all four parameters (scaling ``original_max_seq_len`` and both
    frequency factors together leaves them unchanged), so Meta's published choice is assumed
    (low 1, high 4, original context from the metadata or 8192) with ``factor`` read off the
    largest divisor, and the whole tensor must then match; otherwise ValueError.
    """
    factors = factors.detach().float().flatten()
    if factors.numel() != head_dim // 2:
        raise ValueError(f"rope_freqs has {factors.numel()} entries, expected head_dim/2 = {head_dim // 2}")
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    candidate = RopeScaling(factor=round(float(factors.max()), 4), original_max_seq_len=original_max_seq_len)
    want = gguf_rope_factors(head_dim, theta, candidate)
    if not torch.allclose(factors, want, rtol=1e-4, atol=1e-6):
        worst = int((factors - want).abs().argmax())
        raise ValueError(f"rope_freqs does not match Llama 3.1 RoPE scaling (factor={candidate.factor}, "
                         f"low_freq_factor=1, high_freq_factor=4, original_max_seq_len={original_max_seq_len}): "
                         f"entry {worst} is {float(factors[worst]):.6g}, expected {float(want[worst]):.6g}")
    return candidate
