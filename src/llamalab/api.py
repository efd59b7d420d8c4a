"""``llamalab.load``: any checkpoint (path or registered name) -> a ready-to-run model and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import build_model, read_checkpoint
from llamalab.config import ModelConfig
from llamalab.model import Transformer


@dataclass
class LoadedModel:
    """A built model (eval mode) with the tokenizer and facts of the checkpoint it came from."""

    model: Transformer
    tokenizer: Any | None  # llamalab.tokenizer.Tokenizer
    config: ModelConfig
    format: str
    path: Path
    checkpoint_metadata: dict[str, Any] = field(default_factory=dict)


def load(source: str | os.PathLike[str], dtype: torch.dtype | None = torch.float32,
         device: torch.device | str = "cpu") -> LoadedModel:
    """Read ``source`` (Meta / HF / GGUF / native, or a registered name such as ``smollm2-135m-instruct``)
    and build its Transformer in ``dtype`` on ``device``, in eval mode.

    ``dtype=None`` is "as stored": a quantized GGUF keeps its weights in their blocks and runs on
    llamalab's quantized kernels (:func:`llamalab.quant.quantized_model`, fp32 activations); any
    other checkpoint is built in the precision ``auto`` picks for this machine. With a float
    ``dtype`` quantized GGUF weights are dequantized one tensor at a time while the model is built.
    """
    ckpt = read_checkpoint(source)
    if dtype is None:
        from llamalab.quant import has_quantized_weights, quantized_model

        if has_quantized_weights(ckpt) and str(device) == "cpu":
            return LoadedModel(model=quantized_model(ckpt), tokenizer=ckpt.tokenizer, config=ckpt.config,
                               format=ckpt.format, path=ckpt.path,
                               checkpoint_metadata={**ckpt.metadata, "quantized": True})
        from llamalab.precision import resolve_dtype

        dtype = resolve_dtype("auto", device)
    model = build_model(ckpt, dtype=dtype, device=device)
    return LoadedModel(model=model, tokenizer=ckpt.tokenizer, config=ckpt.config, format=ckpt.format,
                       path=ckpt.path, checkpoint_metadata=ckpt.metadata)


__all__ = ["LoadedModel", "load"]
