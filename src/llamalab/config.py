"""Model configuration: one dataclass and the published LLaMA-family hyper-parameters.

Every preset is written as the paper or the released ``params.json`` gives it, so
``ModelConfig`` can be built from a preset name, a Meta ``params.json``, a HF
``config.json`` or GGUF metadata (the converters in :mod:`llamalab.checkpoint`
fill it) and compared field by field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling ("llama3" rope type).

    Wavelengths shorter than ``original_max_seq_len / high_freq_factor`` keep their
    frequency, those longer than ``original_max_seq_len / low_freq_factor`` are
    divided by ``factor``, and the band in between is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelConfig:
    """Hyper-parameters of a LLaMA-family decoder-only transformer.

    ``hidden_dim`` is the SwiGLU width. When it is ``None`` it follows Meta's rule:
    ``2/3 * 4 * dim``, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``.
    Checkpoints that state their width (HF ``intermediate_size``, GGUF
    ``feed_forward_length``) set it directly.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width: explicit ``hidden_dim`` or Meta's rounding rule."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shapes (no model is built)."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * self.n_heads * hd * 2 + self.dim * kv * hd * 2
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        total = self.n_layers * per_layer + self.dim
        if include_embeddings:
            total += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the native checkpoint's ``config.json``)."""
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a JSON file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)


def _llama1(dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    # LLaMA 1 (Touvron et al. 2023, table 2); params.json: multiple_of 256, norm_eps 1e-6.
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000,
                       multiple_of=256, norm_eps=1e-6, max_seq_len=2048)


def _llama2(dim: int, n_layers: int, n_heads: int, **kw: Any) -> ModelConfig:
    # Llama 2: same shapes as LLaMA 1 with a 4096 context; 70B adds GQA (8 KV heads).
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=32000,
                       multiple_of=kw.pop("multiple_of", 256), norm_eps=1e-5, max_seq_len=4096, **kw)


def _llama3(dim: int, n_layers: int, n_heads: int, *, multiple_of: int, ffn_dim_multiplier: float,
            scaled: bool) -> ModelConfig:
    # Llama 3 / 3.1 params.json: 128256 vocab, theta 500000, 8 KV heads; 3.1 adds RoPE scaling
    # and a 128K context.
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
                       multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=_LLAMA31_SCALING if scaled else None,
                       max_seq_len=131072 if scaled else 8192)


PRESETS: dict[str, ModelConfig] = {
    "llama1-7b": _llama1(4096, 32, 32),
    "llama1-13b": _llama1(5120, 40, 40),
    "llama1-33b": _llama1(6656, 60, 52),
    "llama1-65b": _llama1(8192, 80, 64),
    "llama2-7b": _llama2(4096, 32, 32),
    "llama2-13b": _llama2(5120, 40, 40),
    "llama2-70b": _llama2(8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3-8b": _llama3(4096, 32, 32, multiple_of=1024, ffn_dim_multiplier=1.3, scaled=False),
    "llama3-70b": _llama3(8192, 80, 64, multiple_of=4096, ffn_dim_multiplier=1.3, scaled=False),
    # The 405B shape before the 3.1 release's RoPE scaling and 128K context (what pre-training starts from).
    "llama3-405b": _llama3(16384, 126, 128, multiple_of=4096, ffn_dim_multiplier=1.2, scaled=False),
    "llama3.1-8b": _llama3(4096, 32, 32, multiple_of=1024, ffn_dim_multiplier=1.3, scaled=True),
    "llama3.1-70b": _llama3(8192, 80, 64, multiple_of=4096, ffn_dim_multiplier=1.3, scaled=True),
    "llama3.1-405b": _llama3(16384, 126, 128, multiple_of=4096, ffn_dim_multiplier=1.2, scaled=True),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json.
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                hidden_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    # CPU-sized models for tests and the golden run (llama2.c's 15M "stories" shape).
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                        max_seq_len=128),
    # llama2.c's 15M model: its classifier shares the embedding table (15.2M parameters).
    "tiny-15m": ModelConfig(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32,
                            max_seq_len=256, tie_embeddings=True),
}

# Published parameter counts (papers / model cards), used by the preset tests.
PUBLISHED_PARAMS: dict[str, float] = {
    "llama1-7b": 6.7e9,
    "llama1-13b": 13.0e9,
    "llama1-33b": 32.5e9,
    "llama1-65b": 65.2e9,
    "llama2-7b": 6.7e9,
    "llama2-13b": 13.0e9,
    "llama2-70b": 69.0e9,
    "llama3-8b": 8.0e9,
    "llama3-70b": 70.6e9,
    "llama3-405b": 405.9e9,
    "llama3.1-8b": 8.0e9,
    "llama3.1-70b": 70.6e9,
    "llama3.1-405b": 405.9e9,
    "smollm2-135m": 134.5e6,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of the named preset, with fields overridden."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    return dataclasses.replace(base, **overrides)
