"""Checkpoint averaging: the uniform mean of several checkpoints of one model.

Llama 3 (Dubey et al. 2024, §3.4.3) makes its final pre-trained model as "the average of model
checkpoints (Polyak (1991) averaging) during annealing"; the trainer does it at the end of a run
with ``checkpoint.average_anneal`` (``train/loop.py``), and ``llamalab average`` does it for any
checkpoints llamalab reads (training steps, native, HF, Meta, GGUF dequantized), for example the
anneal's checkpoints of a run made elsewhere.

The mean is taken tensor by tensor (float64 accumulation, stored in the first checkpoint's
dtype), so at most one tensor of each input is in memory at a time: the inputs stay memory-mapped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from llamalab.checkpoint.base import Checkpoint, CheckpointError

__all__ = ["average_checkpoints"]


class _MeanStateDict(Mapping[str, Tensor]):
    """name -> the mean of that tensor over the checkpoints, computed on lookup."""

    def __init__(self, state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> None:
        self.state_dicts, self.weights = state_dicts, weights

    def __getitem__(self, name: str) -> Tensor:
        first = self.state_dicts[0][name]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for sd, w in zip(self.state_dicts, self.weights):
            acc.add_(sd[name].to(torch.float64), alpha=w)
        return acc.to(first.dtype if first.is_floating_point() else torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state_dicts[0])

    def __len__(self) -> int:
        return len(self.state_dicts[0])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, without computing any mean."""
        return {k: tuple(self.state_dicts[0][k].shape) for k in self}


def _shape(sd: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    shapes = getattr(sd, "shapes", None)
    return tuple(shapes()[name]) if callable(shapes) else tuple(sd[name].shape)


def average_checkpoints(sources: Sequence[str | os.PathLike[str]], *,
                        weights: Sequence[float] | None = None) -> Checkpoint:
    """The mean of ``sources`` (paths or registered names of one model: same config, same
    tensors) as a Checkpoint with the first one's config and tokenizer; ``weights`` (default
    uniform) are normalised to sum to 1. Writes nothing: pass it to ``write_checkpoint``.

    Raises CheckpointError naming the checkpoint whose config or tensors differ from the first."""
    from llamalab.checkpoint import read_checkpoint

    if len(sources) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints, got {len(sources)}")
    w = [1.0] * len(sources) if weights is None else [float(x) for x in weights]
    if len(w) != len(sources) or any(x < 0 for x in w) or sum(w) <= 0:
        raise CheckpointError(f"weights {list(w)}: expected {len(sources)} non-negative numbers with a positive sum")
    w = [x / sum(w) for x in w]
    ckpts = [read_checkpoint(s) for s in sources]
    first = ckpts[0]
    # The RoPE fields may differ between training stages without changing a weight; everything
    # that shapes the tensors or their meaning must agree.
    base = first.config.to_dict()
    for c in ckpts[1:]:
        diff = sorted(k for k, v in c.config.to_dict().items() if base.get(k) != v)
        if diff:
            raise CheckpointError(f"{c.path}: config differs from {first.path} in {', '.join(diff)}; only "
                                  f"checkpoints of one model can be averaged")
        if c.metadata.get("partial") or set(c.state_dict) != set(first.state_dict):
            missing = sorted(set(first.state_dict) ^ set(c.state_dict))[:3]
            raise CheckpointError(f"{c.path}: holds other tensors than {first.path} (e.g. {', '.join(missing)})")
        for name in first.state_dict:
            a, b = _shape(first.state_dict, name), _shape(c.state_dict, name)
            if a != b:
                raise CheckpointError(f"{c.path}: tensor {name} has shape {list(b)}, {first.path} has {list(a)}")
    mean = _MeanStateDict([c.state_dict for c in ckpts], w)
    return Checkpoint(config=first.config, state_dict=mean, tokenizer=first.tokenizer, format=first.format,
                      path=Path(first.path),
                      metadata={"averaged": [str(c.path) for c in ckpts], "weights": w})
