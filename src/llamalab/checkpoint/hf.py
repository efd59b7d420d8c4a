"""Hugging Face ``LlamaForCausalLM`` directories: ``config.json`` + safetensors or ``pytorch_model*.bin``.

Names, the q/k rotary permutation and the config translation live in :mod:`convert`;
this module only finds the files, reads them lazily and writes them back.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamalab.checkpoint import convert
from llamalab.checkpoint.base import Checkpoint, CheckpointError, complete_entries, expected_shapes
from llamalab.checkpoint.native import (
    LazyStateDict,
    SAFETENSORS_INDEX,
    atomic_output_dir,
    converted,
    load_tokenizer_from,
    read_safetensors,
    read_safetensors_index,
    safetensors_dtypes,
    save_tokenizer,
    write_safetensors,
)
from llamalab.config import ModelConfig

BIN_INDEX = "pytorch_model.bin.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Entries of HF state dicts that are buffers, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (it has a ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_config(path: Path) -> ModelConfig:
    """``config.json`` -> ModelConfig; anything that is not a plain LLaMA is a CheckpointError naming the file."""
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in (None, "llama"):
        raise CheckpointError(f"{cfg_path}: model_type {model_type!r} is not supported (expected 'llama')")
    try:
        return convert.config_from_hf(cfg)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{cfg_path}: {what}") from None


def weight_files(path: Path) -> tuple[str, dict[str, Path] | list[Path]]:
    """Which weight files the directory holds: ("safetensors"|"bin", {name: shard} from an index or [file])."""
    if (path / SAFETENSORS_INDEX).is_file():
        return "safetensors", read_safetensors_index(path / SAFETENSORS_INDEX)
    if (path / "model.safetensors").is_file():
        return "safetensors", [path / "model.safetensors"]
    if (path / BIN_INDEX).is_file():
        return "bin", read_safetensors_index(path / BIN_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return "bin", [path / "pytorch_model.bin"]
    lone = sorted(path.glob("*.safetensors"))
    if len(lone) == 1:  # AutoGPTQ's "gptq_model-4bit-128g.safetensors" and the like
        return "safetensors", lone
    raise CheckpointError(f"{path}: config.json but no weights; expected model.safetensors, {SAFETENSORS_INDEX}, "
                          f"pytorch_model.bin or {BIN_INDEX}")


def _files_of(listing: dict[str, Path] | list[Path]) -> list[Path]:
    return sorted(set(listing.values())) if isinstance(listing, dict) else list(listing)


def _read_bin(path: Path) -> dict[str, Tensor]:
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        # mmap keeps the tensors on disk until used (only the zip format, torch >= 1.6, can be
        # mapped; older pickles are read whole); weights_only refuses pickled code.
        sd = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def _tokenizer_path(path: Path) -> Path | None:
    return next((path / f for f in _TOKENIZER_FILES if (path / f).is_file()), None)


def read_hf(path: Path) -> Checkpoint:
    """Read an HF LLaMA directory into Meta names and layout.

    Tensors stay memory-mapped; the q/k rows are permuted back to Meta's layout when a
    tensor is looked up (a :class:`LazyStateDict`), so no second copy is held.
    """
    from llamalab.quant.gptq_format import gptq_modules, quantization_config

    config = read_hf_config(path)
    qcfg = quantization_config(path)
    kind, listing = weight_files(path)
    files = _files_of(listing)
    # Every tensor an index promises must be in the shard it names.
    promised = dict(listing) if isinstance(listing, dict) else {}
    want = expected_shapes(config)
    entries: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = {}
    dtypes: Counter[str] = Counter()
    for file in files:
        tensors = dict(read_safetensors(file) if kind == "safetensors" else _read_bin(file))
        if qcfg is not None:  # GPTQ linears: dequantized when looked up, then as any HF weight
            hf_want = {convert.meta_name_to_hf(n): s for n, s in want.items()}
            for q in (f"{n.rsplit('.', 1)[0]}.{s}" for n in list(tensors) for s in ("qzeros", "scales", "g_idx")):
                promised.pop(q, None)
            for hf_name, build in gptq_modules(tensors, qcfg, hf_want, file).items():
                promised.pop(hf_name.removesuffix(".weight") + ".qweight", None)
                meta_name = convert.hf_name_to_meta(hf_name)
                entries[meta_name] = (want[meta_name], partial(_gptq_to_meta, hf_name, build, config))
                dtypes[f"gptq-{qcfg['bits']}bit"] += 1
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        for hf_name, t in tensors.items():
            promised.pop(hf_name, None)
            meta_name = convert.hf_name_to_meta(hf_name)
            if meta_name is None:
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {hf_name} (not part of a LLaMA model)")
            if config.tie_embeddings and meta_name == "output.weight":
                continue  # a tied head saved anyway: the embedding is the one used
            if tuple(t.shape) != want[meta_name]:
                raise CheckpointError(f"{file}: tensor {hf_name} has shape {list(t.shape)}, expected "
                                      f"{list(want[meta_name])} for the config in {path / 'config.json'}")
            entries[meta_name] = (want[meta_name], partial(_to_meta, hf_name, t, config))
    if promised:
        name, shard = next(iter(promised.items()))
        raise CheckpointError(f"{shard}: tensor {name} listed in the index is not in this shard")
    complete_entries(entries, want, config, path, read_from=", ".join(f.name for f in files))
    tok_path = _tokenizer_path(path)
    tokenizer = load_tokenizer_from(path, path) if tok_path else None
    metadata: dict[str, Any] = {"files": [str(f) for f in files], "tokenizer_path": str(tok_path) if tok_path else None,
                                "dtypes": dict(dtypes)}
    return Checkpoint(config=config, state_dict=LazyStateDict(entries), tokenizer=tokenizer, format="hf",
                      path=path, metadata=metadata)


def _to_meta(hf_name: str, t: Tensor, config: ModelConfig) -> Tensor:
    return convert.hf_to_meta_tensor(hf_name, t, config)[1]  # type: ignore[index]


def _gptq_to_meta(hf_name: str, build: Callable[[], Tensor], config: ModelConfig) -> Tensor:
    return convert.hf_to_meta_tensor(hf_name, build(), config)[1]  # type: ignore[index]


def hf_tensor_types(path: Path) -> dict[str, int]:
    """dtype -> tensor count, from safetensors headers (a .bin is memory-mapped, not read)."""
    kind, listing = weight_files(path)
    counts: Counter[str] = Counter()
    for file in _files_of(listing):
        if kind == "safetensors":
            counts.update(dtype.lower().replace("f32", "float32").replace("bf16", "bfloat16")
                          .replace("f16", "float16") for dtype, _ in safetensors_dtypes(file).values())
        else:
            counts.update(str(t.dtype).removeprefix("torch.") for t in _read_bin(file).values())
    return dict(counts)


def hf_tokenizer(path: Path) -> Any:
    """The directory's tokenizer, or None when it has no tokenizer file."""
    return load_tokenizer_from(path, path) if _tokenizer_path(path) else None


def write_hf(checkpoint: Checkpoint, dst: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
             max_shard_size: int = 5 * 2**30, replace: dict[str, Tensor] | None = None,
             drop: set[str] | None = None, quantization_config: dict[str, Any] | None = None) -> Path:
    """Write an HF ``LlamaForCausalLM`` directory that ``from_pretrained`` and ``AutoTokenizer`` load.

    Tied embeddings are written as ``tie_word_embeddings: true`` without ``lm_head.weight``.
    ``drop`` (Meta names) leaves weights out and ``replace`` adds HF-named tensors as they are, with
    ``quantization_config`` in config.json (and quantize_config.json): how GPTQ directories are
    written (:mod:`llamalab.quant.gptq_format`).
    """
    config = checkpoint.config
    drop = drop or set()

    def rename(name: str) -> str | None:
        if name in drop:
            return None
        return None if config.tie_embeddings and name == "output.weight" else convert.meta_name_to_hf(name)

    def to_hf(name: str, t: Tensor) -> Tensor:
        t = convert.meta_to_hf_tensor(name, t, config)[1]
        return t if dtype is None else t.to(dtype)

    hf_sd = converted(checkpoint.state_dict, rename, to_hf)
    if replace:
        entries = {k: hf_sd._entries[k] for k in hf_sd}
        entries.update({k: (tuple(v.shape), partial(lambda v: v, v)) for k, v in replace.items()})
        hf_sd = LazyStateDict(entries)
    tok = checkpoint.tokenizer
    if str(getattr(tok, "name", "")).startswith("tiktoken:"):
        warnings.warn(f"{dst}: a tiktoken (Llama 3) tokenizer.model is copied as is; transformers needs a "
                      f"tokenizer.json converted from it to load the tokenizer", stacklevel=2)
    bos = getattr(tok, "bos_id", None)
    eos = getattr(tok, "eos_id", None)
    with atomic_output_dir(dst) as tmp:
        _, dtypes = write_safetensors(hf_sd, tmp, max_shard_size=max_shard_size)
        floats = [(d, n) for d, n in dtypes.most_common() if "float" in d] or dtypes.most_common(1)
        cfg = convert.config_to_hf(config, bos_id=bos, eos_id=eos, torch_dtype=floats[0][0])
        if quantization_config is not None:
            cfg["quantization_config"] = quantization_config
            (tmp / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen: dict[str, Any] = {"_from_model_config": True}
        if bos is not None:
            gen["bos_token_id"] = bos
        if eos is not None:
            stops = sorted(getattr(tok, "stop_ids", None) or {eos})
            gen["eos_token_id"] = eos if stops == [eos] else [eos, *[s for s in stops if s != eos]]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_tokenizer(tok, tmp, config)
    return Path(dst).expanduser().absolute()
