"""Presets against the published parameter counts, counted on a model built on the meta device."""

from __future__ import annotations

import pytest
import torch

from llamalab.config import PRESETS, PUBLISHED_PARAMS, ModelConfig, RopeScaling, get_preset
from llamalab.model import Transformer


def count_params(config: ModelConfig) -> int:
    """Parameters of a real module tree on the meta device (no memory), the tied head counted once."""
    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_published(name: str) -> None:
    n = count_params(PRESETS[name])
    published = PUBLISHED_PARAMS[name]
    assert abs(n - published) / published < 0.01, f"{name}: {n / 1e9:.3f}B vs published {published / 1e9:.3f}B"
    assert n == PRESETS[name].num_params()


def test_published_hyperparameters() -> None:
    """Spot checks against the papers' tables and the released params.json files."""
    l7 = PRESETS["llama1-7b"]
    assert (l7.dim, l7.n_layers, l7.n_heads, l7.max_seq_len, l7.vocab_size) == (4096, 32, 32, 2048, 32000)
    assert l7.ffn_hidden_dim == 11008  # 2/3 * 4 * 4096 rounded up to a multiple of 256
    assert PRESETS["llama1-65b"].ffn_hidden_dim == 22016
    l70 = PRESETS["llama2-70b"]
    assert (l70.n_kv_heads, l70.max_seq_len, l70.ffn_hidden_dim) == (8, 4096, 28672)
    l3 = PRESETS["llama3-8b"]
    assert (l3.vocab_size, l3.rope_theta, l3.n_kv_heads, l3.ffn_hidden_dim) == (128256, 500000.0, 8, 14336)
    assert l3.rope_scaling is None
    assert PRESETS["llama3.1-405b"].rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert PRESETS["llama3.1-405b"].ffn_hidden_dim == 53248
    s = PRESETS["smollm2-135m"]
    assert (s.n_heads, s.n_kv_heads, s.head_dim, s.tie_embeddings) == (9, 3, 64, True)


def test_config_validation_and_round_trip(tmp_path) -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("llama9-1t")
    cfg = get_preset("llama3.1-8b", n_layers=2)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"dim": 8, "bogus": 1})
