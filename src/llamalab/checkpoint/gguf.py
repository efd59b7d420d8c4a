"""GGUF files (llama.cpp): metadata -> ModelConfig, vocabulary -> tokenizer, tensors dequantized to torch.

Reading goes through llamalab's header reader and a memory map; quantized tensors are turned
into floats by ``gguf.quants.dequantize`` when they are looked up, one at a time, so
building a model never holds a second dequantized copy of it. GGUF lists dimensions
fastest-first (ggml order): a ``(out, in)`` weight is stored as ``[in, out]`` and is
reversed here. llama.cpp's converter undoes HF's q/k permutation, so ``attn_q``/``attn_k``
are already in Meta's interleaved rotary layout (the parity tests check this against
transformers' own GGUF loader and the real SmolLM2 file).
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llamalab.checkpoint import convert
from llamalab.checkpoint.base import Checkpoint, CheckpointError, complete_entries, expected_shapes
from llamalab.checkpoint.native import LazyStateDict
from llamalab.config import ModelConfig

GGUF_MAGIC = b"GGUF"
_ROPE_FREQS = "rope_freqs.weight"


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its raw bytes (a view of the file map) and how to read them."""

    name: str
    type_name: str
    type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order: (out, in)
    data: np.ndarray
    offset: int
    nbytes: int


@dataclass
class GGUFFile:
    """The parts of a GGUF file llamalab uses; the gguf-py reader itself (heavy) is not kept."""

    path: Path
    fields: dict[str, Any]
    tensors: list[GGUFTensor]
    file_map: Any  # the np.memmap the tensor views point into


# numpy dtypes of the unquantized tensor types (as gguf-py's reader views them); any other type is
# a uint8 (rows, row_bytes) matrix of blocks.
_PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


def open_gguf(path: Path) -> GGUFFile:
    """Parse ``path``'s header; every problem is a CheckpointError naming the file (and tensor).

    The header goes through :func:`~llamalab.checkpoint.gguf_header.read_gguf_header` (gguf-py's
    reader builds numpy objects per vocabulary string: 3-6 s for a 49k-token vocabulary against
    ~0.1 s); the tensors are views of one read-only ``np.memmap`` of the file, shaped as gguf-py
    shapes them.
    """
    import gguf

    from llamalab.checkpoint.gguf_header import read_gguf_header

    try:
        header = read_gguf_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    except ValueError as e:
        if "unknown ggml type id" in str(e):
            raise CheckpointError(f"{path}: {e} (not a GGUF quantization type gguf-py knows; a newer llama.cpp "
                                  f"format?)") from None
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    file_map = np.memmap(path, dtype=np.uint8, mode="r")
    plain = file_map.view(np.ndarray)  # slicing a memmap costs bookkeeping per view; the map stays alive
    tensors = []
    for t in header.tensors:
        qtype = gguf.GGMLQuantizationType(t.type_id)
        raw = plain[t.offset:t.offset + t.nbytes]
        np_dims = tuple(reversed(t.dims))
        if qtype.name in _PLAIN_TYPES:
            data = raw.view(_PLAIN_TYPES[qtype.name]).reshape(np_dims)
        else:
            data = raw.reshape(gguf.quant_shape_to_byte_shape(np_dims, qtype))
        tensors.append(GGUFTensor(name=t.name, type_name=qtype.name, type=qtype, shape=np_dims, data=data,
                                  offset=t.offset, nbytes=t.nbytes))
    fields = {k: v for k, v in header.fields.items() if not k.startswith("GGUF.")}
    return GGUFFile(path=path, fields=fields, tensors=tensors, file_map=file_map)


def _release(f: GGUFFile, t: GGUFTensor) -> None:
    """Let the kernel drop the mapped pages of a tensor just read (clean pages, re-read if touched)."""
    mm = getattr(f.file_map, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = t.offset - t.offset % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
    except (OSError, ValueError, AttributeError):
        pass  # only an optimisation


def _dequantize(f: GGUFFile, t: GGUFTensor, data: np.ndarray | None = None) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(t.data if data is None else data, t.type)
    except NotImplementedError:
        raise CheckpointError(f"{f.path}: tensor {t.name} has quantization type {t.type_name}, which "
                              f"llamalab cannot dequantize (gguf-py has no dequantizer for it)") from None


_TORCH_DEQUANTIZED = ("Q8_0", "Q4_0", "Q4_1")


def gguf_tensor(f: GGUFFile, t: GGUFTensor, dtype: torch.dtype | None = None) -> Tensor:
    """One GGUF tensor as a new torch tensor in PyTorch shape.

    F16 and BF16 keep their dtype; everything else becomes float32, or ``dtype`` (fp32/bf16)
    straight from the blocks where the dequantizer can.
    """
    if t.type_name == "F16":
        out = torch.from_numpy(t.data.view(np.float16).copy())
    elif t.type_name == "BF16":
        out = torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16)
    elif t.type_name == "F32":
        out = torch.from_numpy(t.data.view(np.float32).copy())
    elif t.type_name in _TORCH_DEQUANTIZED:
        # torch's vectorised dequantizer (llamalab.quant.blocks) is ~5-10x faster than gguf-py's
        # numpy one on these types (equal bit for bit: tests/test_quant.py).
        from llamalab.quant.blocks import dequantize

        out = dequantize(torch.from_numpy(t.data.copy()), t.type_name, t.shape[-1],
                         dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32)
    else:
        out = torch.from_numpy(_dequantize(f, t))
    _release(f, t)
    return out.reshape(t.shape)


def _check_types(f: GGUFFile) -> None:
    """Refuse, before anything is built, a tensor type gguf-py cannot dequantize."""
    seen: set[str] = set()
    for t in f.tensors:
        if t.type_name in seen:
            continue
        seen.add(t.type_name)
        # One row is enough to learn whether this type can be dequantized.
        row = t.data.reshape(-1, t.data.shape[-1])[:1] if t.data.ndim > 1 else t.data
        _dequantize(f, t, row)


def gguf_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from the metadata, plus what only the tensors tell: a tied head, RoPE scaling."""
    try:
        config = convert.config_from_gguf(f.fields)
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from None
    names = {t.name for t in f.tensors}
    # llama.cpp's converter writes no output.weight when the head is tied to the embedding.
    config = config.replace(tie_embeddings="output.weight" not in names)
    freqs = next((t for t in f.tensors if t.name == _ROPE_FREQS), None)
    if freqs is not None:
        orig = int(f.fields.get("llama.rope.scaling.original_context_length") or 8192)
        try:
            scaling = convert.rope_scaling_from_gguf_factors(gguf_tensor(f, freqs).float(), config.head_dim,
                                                             config.rope_theta, orig)
        except ValueError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        config = config.replace(rope_scaling=scaling)
    return config


def gguf_tokenizer(f: GGUFFile) -> Any:
    """The tokenizer the file's ``tokenizer.ggml.*`` metadata describes (None when it has none)."""
    if "tokenizer.ggml.tokens" not in f.fields:
        return None
    from llamalab.tokenizer import TokenizerError, tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(f.fields, source=str(f.path))
    except TokenizerError as e:
        raise CheckpointError(f"{f.path}: tokenizer metadata could not be read: {e}") from None


def _scalar_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The small metadata entries (general.*, llama.*) worth keeping in a description."""
    return {k: v for k, v in fields.items() if not isinstance(v, list) and not k.startswith("tokenizer.")}


def read_gguf(path: Path) -> Checkpoint:
    """Read a llama-architecture GGUF file into a Checkpoint with Meta names.

    The state dict is a :class:`LazyStateDict`: a tensor is dequantized when it is looked
    up, so building a model holds the model plus one dequantized tensor, not two models.
    ``metadata["quantization"]`` counts tensors per type; ``metadata["tensor_types"]`` gives
    each Meta-named tensor's type; ``blocks`` holds the quantized tensors as stored (for
    :func:`llamalab.quant.quantized_model`).
    """
    f = open_gguf(path)
    config = gguf_config(f)
    _check_types(f)
    want = expected_shapes(config)
    entries: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = {}
    tensor_types: dict[str, str] = {}
    blocks: dict[str, GGUFTensor] = {}
    for t in f.tensors:
        if t.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = convert.gguf_name_to_meta(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not part of a llama model)")
        if t.shape != want[name]:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected {list(want[name])} "
                                  f"for the model its metadata describes")
        entries[name] = (want[name], partial(gguf_tensor, f, t))
        tensor_types[name] = t.type_name
        if t.type_name not in ("F32", "F16", "BF16"):
            blocks[name] = t
    complete_entries(entries, want, config, path)
    tokenizer = gguf_tokenizer(f)
    metadata = {"files": [str(path)], "tokenizer_path": str(path) if tokenizer is not None else None,
                "quantization": dict(Counter(tensor_types.values())), "tensor_types": tensor_types,
                "gguf": _scalar_fields(f.fields)}
    return Checkpoint(config=config, state_dict=LazyStateDict(entries, fresh=True), tokenizer=tokenizer, format="gguf",
                      path=path, metadata=metadata, blocks=blocks)


def describe_gguf(path: Path) -> tuple[ModelConfig, Any, dict[str, int], dict[str, Any]]:
    """(config, tokenizer, quantization type -> tensor count, scalar metadata), nothing dequantized."""
    f = open_gguf(path)
    config = gguf_config(f)
    quant = dict(Counter(t.type_name for t in f.tensors if t.name != _ROPE_FREQS))
    return config, gguf_tokenizer(f), quant, _scalar_fields(f.fields)
