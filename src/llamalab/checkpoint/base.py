"""What every checkpoint reader returns, the one error they raise, and building a model from it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llamalab.config import ModelConfig
from llamalab.model import Transformer


class CheckpointError(Exception):
    """A checkpoint could not be read or written; the message names the file and what was expected."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk, in llamalab's terms.

    ``state_dict`` uses Meta's names and rotary layout. It may be any mapping: tensors may
    be memory-mapped views of the files, or a lazy mapping may build each tensor when it is
    looked up (Meta's sharded checkpoints are merged one tensor at a time). A lazy mapping
    offers ``shapes()`` (name -> shape without reading data) so that checks stay cheap, and
    may offer ``load(name, dtype=, device=)``, a new tensor built straight in the wanted
    dtype and device. :func:`build_model` looks each tensor up once and copies it once into
    the model.
    """

    config: ModelConfig
    state_dict: Mapping[str, Tensor]
    tokenizer: Any | None  # llamalab.tokenizer.Tokenizer
    format: str  # "meta" | "hf" | "gguf" | "native"
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    # Quantized tensors as the file stores them (GGUF: Meta name -> GGUFTensor, its blocks a view
    # of the file map), for llamalab.quant to run them in their blocks; None for other formats.
    blocks: Mapping[str, Any] | None = None


_INIT_FUNCTIONS = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "ones_", "zeros_")


@contextmanager
def _skip_init() -> Iterator[None]:
    """Modules built inside skip their random initialisation (``torch.nn.init``'s functions do nothing).

    On the meta device there is nothing to initialise, yet the first init call of a process costs
    seconds: it imports torch's reference implementations (and Dynamo) to run it on meta tensors
    (2-4 s of a GGUF load, measured). Every weight is assigned from the checkpoint afterwards.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def meta_model(config: ModelConfig) -> Transformer:
    """The Transformer for ``config`` on the meta device: shapes and names, no memory."""
    with torch.device("meta"), _skip_init():
        return Transformer(config)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Meta name -> shape for every weight of a model with this config (built on the meta device)."""
    model = meta_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tensor_shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape, from a lazy mapping's ``shapes()`` when it has one (looking tensors up could load them)."""
    shapes = getattr(state_dict, "shapes", None)
    if callable(shapes):
        return {k: tuple(v) for k, v in shapes().items()}
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def complete_entries(entries: dict[str, Any], want: Mapping[str, tuple[int, ...]], config: ModelConfig,
                     source: str | Path, read_from: str = "") -> None:
    """Share the tied head with the embedding and raise CheckpointError if a wanted tensor is absent.

    ``entries`` maps Meta names to whatever a reader holds per tensor (a lazy loader, a view);
    ``read_from`` adds which files were read to the message.
    """
    if config.tie_embeddings and "tok_embeddings.weight" in entries:
        entries["output.weight"] = entries["tok_embeddings.weight"]
    missing = sorted(set(want) - set(entries))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        where = f" (read {read_from})" if read_from else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}{where}")


def check_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig, source: str | Path) -> None:
    """Raise CheckpointError naming ``source`` and the tensor if names or shapes do not fit ``config``."""
    have = tensor_shapes(state_dict)
    want = expected_shapes(config)
    missing = sorted(set(want) - set(have))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(have) - set(want))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}")
    for name, shape in want.items():
        got = have[name]
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(got)}, expected {list(shape)} "
                                  f"for this config")


def build_model(checkpoint: Checkpoint, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu",
                hold: Callable[[str], torch.dtype | None] | None = None) -> Transformer:
    """Build the Transformer on the meta device and move each checkpoint tensor in once.

    No random initialisation and no second full copy: peak memory is the model plus
    the tensor being converted. ``hold(name)``, where given and not None, is the dtype to keep
    that tensor in: it is built in ``dtype`` and converted at once (LoRA's frozen linears in
    bf16 are exactly the bf16 rounding of the ``dtype`` weights, and no full-size copy in
    ``dtype`` of them ever exists).
    """
    config = checkpoint.config
    check_state_dict(checkpoint.state_dict, config, checkpoint.path)
    model = meta_model(config)
    converted: dict[str, Tensor] = {}
    state_dict = checkpoint.state_dict
    # A lazy mapping that can build a tensor in the final dtype saves an intermediate copy
    # (and the heap fragmentation that freeing many of them leaves behind).
    load = getattr(state_dict, "load", None)
    for name in state_dict:
        if config.tie_embeddings and name == "output.weight":
            continue
        if callable(load):
            converted[name] = load(name, dtype=dtype, device=device)
        else:
            converted[name] = state_dict[name].to(device=device, dtype=dtype, copy=True)
        held = hold(name) if hold is not None else None
        if held is not None and held != converted[name].dtype:
            converted[name] = converted[name].to(held)
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


__all__ = ["Checkpoint", "CheckpointError", "build_model", "check_state_dict", "complete_entries",
           "expected_shapes", "meta_model", "model_state_dict", "tensor_shapes"]
