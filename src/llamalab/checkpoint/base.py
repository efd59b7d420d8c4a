"""What every checkpoint reader returns, the one error they raise, and building a model from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamalab.config import ModelConfig
from llamalab.model import Transformer


class CheckpointError(Exception):
    """A checkpoint could not be read or written; the message names the file and what was expected."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk, in llamalab's terms.

    ``state_dict`` uses Meta's names and rotary layout. Tensors may be memory-mapped
    views of the files: :func:`build_model` copies each one once into the model.
    """

    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: Any | None  # llamalab.tokenizer.Tokenizer
    format: str  # "meta" | "hf" | "gguf" | "native"
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Meta name -> shape for every weight of a model with this config (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state_dict: dict[str, Tensor], config: ModelConfig, source: str | Path) -> None:
    """Raise CheckpointError naming ``source`` and the tensor if names or shapes do not fit ``config``."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(state_dict) - set(want))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}")
    for name, shape in want.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(got)}, expected {list(shape)} "
                                  f"for this config")


def build_model(checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Transformer:
    """Build the Transformer on the meta device and move each checkpoint tensor in once.

    No random initialisation and no second full copy: peak memory is the model plus
    the tensor being converted.
    """
    config = checkpoint.config
    check_state_dict(checkpoint.state_dict, config, checkpoint.path)
    with torch.device("meta"):
        model = Transformer(config)
    converted: dict[str, Tensor] = {}
    for name, t in checkpoint.state_dict.items():
        if config.tie_embeddings and name == "output.weight":
            continue
        converted[name] = t.to(device=device, dtype=dtype, copy=True)
    if config.tie_embeddings:
        converted["output.weight"] = converted["tok_embeddings.weight"]
    model.load_state_dict(converted, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers(device)
    return model.eval()


def model_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's weights by Meta name (the tied head included once under ``output.weight`` too)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


__all__ = ["Checkpoint", "CheckpointError", "build_model", "check_state_dict", "expected_shapes",
           "model_state_dict"]
