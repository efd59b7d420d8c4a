"""Checkpoints: one reader that recognises the format, one writer per target format, a cheap description.

Formats: Meta release folders (``params.json`` + ``consolidated.NN.pth``), Hugging Face
directories (``config.json`` + safetensors / ``pytorch_model*.bin``), GGUF files
(llama.cpp) and llamalab's native directory (``llamalab.json`` + ``model.safetensors``).
Sources are paths or registered names (see :mod:`llamalab.checkpoint.registry`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    build_model,
    check_state_dict,
    expected_shapes,
    model_state_dict,
)
from llamalab.checkpoint.registry import registered_names, resolve

FORMATS = ("meta", "hf", "gguf", "native")
_EXPECTED = ("expected a Meta folder (params.json + consolidated.NN.pth), a Hugging Face folder (config.json + "
             "model.safetensors or pytorch_model.bin), a llamalab folder (llamalab.json + model.safetensors) "
             "or a .gguf file")


def _is_meta_dir(path: Path) -> bool:
    try:
        from llamalab.checkpoint.meta import is_meta_dir
    except ImportError:  # the Meta reader is optional for the other formats
        return (path / "params.json").is_file()
    return is_meta_dir(path)


def detect_format(path: Path) -> tuple[str, Path]:
    """(format name, the path to read) for an existing path; CheckpointError naming it if none fits."""
    from llamalab.checkpoint import gguf, hf, native

    if path.is_file():
        if gguf.is_gguf_file(path):
            return "gguf", path
        raise CheckpointError(f"{path}: not a checkpoint file (no GGUF magic bytes); {_EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    if native.is_native_dir(path):
        return "native", path
    if _is_meta_dir(path):
        return "meta", path
    if hf.is_hf_dir(path):
        return "hf", path
    ggufs = sorted(p for p in path.glob("*.gguf") if gguf.is_gguf_file(p))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); "
                              f"name the one to read")
    raise CheckpointError(f"{path}: unknown checkpoint format; {_EXPECTED}")


def _check_vocab(ckpt: Checkpoint) -> None:
    """A tokenizer that can emit ids the embedding does not have would index out of range at run time."""
    tok = ckpt.tokenizer
    if tok is None or tok.vocab_size <= ckpt.config.vocab_size:
        return
    tok_file = ckpt.metadata.get("tokenizer_path") or getattr(tok, "name", "the tokenizer")
    raise CheckpointError(f"{tok_file}: tokenizer has {tok.vocab_size} tokens but the model in {ckpt.path} has "
                          f"vocab_size {ckpt.config.vocab_size}; the tokenizer does not belong to these weights")


def read_checkpoint(source: str | os.PathLike[str], *, verify_checksums: bool = True) -> Checkpoint:
    """Read any supported checkpoint (path or registered name) into Meta names and layout.

    Tensors are memory-mapped or built on lookup where the format allows, so reading is
    cheap and :func:`build_model` peaks near the size of the model it builds.
    """
    kind, path = detect_format(resolve(source))
    if kind == "gguf":
        from llamalab.checkpoint.gguf import read_gguf

        ckpt = read_gguf(path)
    elif kind == "hf":
        from llamalab.checkpoint.hf import read_hf

        ckpt = read_hf(path)
    elif kind == "native":
        from llamalab.checkpoint.native import read_native

        ckpt = read_native(path)
    else:
        from llamalab.checkpoint.meta import read_meta

        ckpt = read_meta(path, verify_checksums=verify_checksums)
    _check_vocab(ckpt)
    return ckpt


def _as_checkpoint(obj: Any) -> Checkpoint:
    """A Checkpoint, or one made from a loaded model's current weights (``llamalab.load`` result)."""
    if isinstance(obj, Checkpoint):
        return obj
    model = getattr(obj, "model", None)
    if model is None or not hasattr(obj, "config"):
        raise TypeError(f"write_checkpoint: expected a Checkpoint or a LoadedModel, got {type(obj).__name__}")
    return Checkpoint(config=obj.config, state_dict=model_state_dict(model), tokenizer=obj.tokenizer,
                      format=getattr(obj, "format", "native"), path=Path(getattr(obj, "path", ".")),
                      metadata=dict(getattr(obj, "checkpoint_metadata", {}) or {}))


def write_checkpoint(checkpoint_or_loaded: Any, dst: str | os.PathLike[str], to: str = "native", n_shards: int = 1,
                     *, dtype: torch.dtype | None = None, max_shard_size: int = 5 * 2**30,
                     tensor_type: str | None = None) -> Path:
    """Write a Checkpoint (or a ``LoadedModel``'s weights) as ``to`` = "native", "hf", "meta" or "gguf".

    ``tensor_type`` (GGUF only): the matrices' type, f32 / f16 (default) / bf16 / q8_0 / q4_0 / q4_1;
    ``dst`` is then the file to write.

    ``dst`` must not exist (an empty directory is accepted); it appears atomically.
    ``n_shards`` is Meta's model-parallel shard count; ``max_shard_size`` (bytes) splits
    native/HF safetensors into indexed shards. Tensors keep their dtype unless ``dtype``
    is given. Returns the written directory.
    """
    ckpt = _as_checkpoint(checkpoint_or_loaded)
    dst = Path(dst).expanduser()
    if to == "native":
        from llamalab.checkpoint.native import write_native

        return write_native(ckpt, dst, dtype=dtype, max_shard_size=max_shard_size)
    if to == "hf":
        from llamalab.checkpoint.hf import write_hf

        return write_hf(ckpt, dst, dtype=dtype, max_shard_size=max_shard_size)
    if to == "meta":
        from llamalab.checkpoint.meta import write_meta

        tok_path = getattr(ckpt.tokenizer, "path", None)
        if ckpt.tokenizer is not None and not (tok_path and Path(tok_path).is_file()):
            warnings.warn(f"{dst}: Meta folders hold a tokenizer.model; {ckpt.tokenizer.name} has none, so "
                          f"tokenizer.json is written instead (llamalab and transformers read it, Meta's code "
                          f"does not)", stacklevel=2)
            tok_path = None
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()  # an empty destination counts as absent, as for the other formats
        return write_meta(ckpt.config, ckpt.state_dict, dst, n_shards=n_shards, tokenizer_path=tok_path, dtype=dtype,
                          tokenizer=ckpt.tokenizer if tok_path is None else None)
    if to == "gguf":
        from llamalab.checkpoint.gguf_write import write_gguf

        return write_gguf(ckpt, dst, tensor_type or "f16")
    raise ValueError(f"write_checkpoint: unknown target format {to!r}; expected 'native', 'hf', 'meta' or 'gguf'")


def _tokenizer_info(tok: Any) -> dict[str, Any] | None:
    if tok is None:
        return None
    return {"kind": type(tok).__name__, "name": getattr(tok, "name", None), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "chat_template": bool(getattr(tok, "chat_template", None))}


def describe(source: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``llamalab info`` prints: format, config, parameter count, memory, tensor types, tokenizer.

    Reads headers and metadata only: no tensor is dequantized, permuted or copied.
    """
    kind, path = detect_format(resolve(source))
    extra: dict[str, Any] = {}
    if kind == "gguf":
        from llamalab.checkpoint.gguf import describe_gguf

        config, tok, types, fields = describe_gguf(path)
        extra["name"] = fields.get("general.name")
    elif kind == "hf":
        from llamalab.checkpoint.hf import hf_tensor_types, hf_tokenizer, read_hf_config

        config, types, tok = read_hf_config(path), hf_tensor_types(path), hf_tokenizer(path)
        from llamalab.quant.gptq_format import quantization_config

        q = quantization_config(path)
        if q is not None:
            extra["quantization"] = (f"gptq {q['bits']}-bit, group {q.get('group_size')}, "
                                     f"{'symmetric' if q.get('sym') else 'asymmetric'}"
                                     f"{', act-order' if q.get('desc_act') else ''} (dequantized at load)")
    elif kind == "native":
        from llamalab.checkpoint.native import load_tokenizer_from, read_native_config, safetensors_dtypes

        config, manifest = read_native_config(path)
        types = {}
        for f in sorted(path.glob("model*.safetensors")):
            for dtype, _ in safetensors_dtypes(f).values():
                types[dtype] = types.get(dtype, 0) + 1
        tok = load_tokenizer_from(path / manifest["tokenizer"], path) if manifest.get("tokenizer") else None
        extra["source"] = manifest.get("source")
    else:
        from llamalab.checkpoint.meta import read_meta

        ckpt = read_meta(path, verify_checksums=False)
        config, tok = ckpt.config, ckpt.tokenizer
        types = {d: None for d in ckpt.metadata.get("dtypes", [])}
        extra["n_shards"] = ckpt.metadata.get("n_shards")
    n_params = config.num_params()
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    info: dict[str, Any] = {
        "format": kind,
        "path": str(path),
        **{k: v for k, v in extra.items() if v is not None},
        "config": {**config.to_dict(), "head_dim": config.head_dim, "ffn_hidden_dim": config.ffn_hidden_dim},
        "parameters": n_params,
        "memory_bytes": {"float32": n_params * 4, "bfloat16": n_params * 2},
        "memory_gb": {"float32": round(n_params * 4 / 1e9, 3), "bfloat16": round(n_params * 2 / 1e9, 3)},
        "size_on_disk_gb": round(sum(f.stat().st_size for f in files) / 1e9, 3),
        "tensor_types": types,
        "tokenizer": _tokenizer_info(tok),
    }
    if tok is not None and tok.vocab_size > config.vocab_size:
        _check_vocab(Checkpoint(config=config, state_dict={}, tokenizer=tok, format=kind, path=path,
                                metadata={"tokenizer_path": getattr(tok, "name", None)}))
    return info


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "build_model", "check_state_dict", "describe",
           "detect_format", "expected_shapes", "read_checkpoint", "registered_names", "write_checkpoint"]
