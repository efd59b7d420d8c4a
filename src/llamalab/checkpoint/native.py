"""llamalab's own checkpoint directory, and the file plumbing every writer shares.

A native checkpoint is a directory with

- ``llamalab.json``: ``{"format": "llamalab", "format_version": 1, "config": ModelConfig.to_dict(),
  "tokenizer": file name or null, "source": {...}}``
- ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``)
  holding the weights under Meta's names and layout; a tied output head is stored once, as
  ``tok_embeddings.weight``;
- the tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``, or ``tokenizer.model``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamalab.checkpoint.base import Checkpoint, CheckpointError, expected_shapes, tensor_shapes
from llamalab.config import ModelConfig
from llamalab.fsutil import fsync_path

NATIVE_CONFIG = "llamalab.json"
FORMAT_VERSION = 1
SAFETENSORS_INDEX = "model.safetensors.index.json"
_DEFAULT_MAX_SHARD = 5 * 2**30


# ---------------------------------------------------------------- atomic directory writes


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success it is fsynced and renamed to ``dst``.

    A crash or an exception leaves ``dst`` untouched (no half-written checkpoint that a
    later run could mistake for a whole one). ``dst`` must not exist or be an empty directory.
    """
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not an empty directory; choose a new destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
        fsync_path(tmp)
        if dst.exists():
            dst.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- lazy state dicts


class LazyStateDict(Mapping[str, Tensor]):
    """Meta-named tensors that are built when looked up (dequantized, permuted ...), never cached.

    ``shapes()`` answers without building anything, so checks stay cheap, and
    :func:`~llamalab.checkpoint.base.build_model` holds one built tensor at a time: peak memory
    is the model plus one tensor. Each lookup builds the tensor again.
    """

    def __init__(self, entries: dict[str, tuple[tuple[int, ...], Callable[..., Tensor]]], *,
                 fresh: bool = False) -> None:
        # fresh: every lookup builds a new tensor that nothing else holds (GGUF's dequantized ones,
        # not views of a mapped file), and the builders take the wanted ``dtype=``: :meth:`load`
        # then builds it in that dtype and needs no copy (a 540 MB copy of a 135M model, ~1 s).
        self._entries = entries
        self._fresh = fresh

    def __getitem__(self, name: str) -> Tensor:
        return self._entries[name][1]()

    def load(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """Tensor ``name`` as a new tensor in ``dtype`` on ``device`` (what build_model asks for)."""
        if self._fresh:
            return self._entries[name][1](dtype=dtype).to(device=device, dtype=dtype)
        return self._entries[name][1]().to(device=device, dtype=dtype, copy=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, from the file headers alone."""
        return {k: shape for k, (shape, _) in self._entries.items()}


# ---------------------------------------------------------------- safetensors


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of one .safetensors file as memory-mapped views; a bad file is a CheckpointError naming it."""
    from safetensors import safe_open

    try:
        # safe_open memory-maps the file: get_tensor returns views, nothing is read until used.
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers/lengths
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def safetensors_dtypes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a .safetensors header alone (for cheap descriptions)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (str(sl.get_dtype()), tuple(sl.get_shape()))
            return out
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def read_safetensors_index(index: Path) -> dict[str, Path]:
    """An HF-style ``*.index.json`` -> {tensor name: shard path}; every listed shard must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index (expected a JSON object with "
                              f"'weight_map'; {type(e).__name__}: {e})") from None
    out = {name: index.parent / shard for name, shard in weight_map.items()}
    for shard in sorted(set(out.values())):
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing shard listed in {index}")
    return out


def write_safetensors(tensors: Mapping[str, Tensor], folder: Path, *, max_shard_size: int = _DEFAULT_MAX_SHARD,
                      stem: str = "model") -> tuple[list[str], Counter[str]]:
    """Write ``tensors`` as ``{stem}.safetensors``, or as numbered shards plus an HF-style index when
    they exceed ``max_shard_size`` bytes. Returns (file names written, dtype -> tensor count).

    Tensors are looked up one at a time and a shard is written as soon as it is full, so a
    lazy mapping (dequantized GGUF, permuted HF) never exists in memory more than a shard at once.
    """
    from safetensors.torch import save_file

    parts: list[tuple[str, list[str]]] = []
    current: dict[str, Tensor] = {}
    size = total = 0
    dtypes: Counter[str] = Counter()

    def flush() -> None:
        # Shard names need the final count, so parts are renamed once all are written.
        fname = f".{stem}.part{len(parts)}.safetensors"
        save_file(_unshare(current), str(folder / fname), metadata={"format": "pt"})
        parts.append((fname, list(current)))

    for name in tensors:
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            flush()
            current, size = {}, 0
        current[name] = t
        dtypes[str(t.dtype).removeprefix("torch.")] += 1
        size += nbytes
        total += nbytes
    if current or not parts:
        flush()
    current = {}
    if len(parts) == 1:
        os.rename(folder / parts[0][0], folder / f"{stem}.safetensors")
        return [f"{stem}.safetensors"], dtypes
    names = [f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for (tmp_name, keys), fname in zip(parts, names):
        os.rename(folder / tmp_name, folder / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, f"{stem}.safetensors.index.json"], dtypes


def converted(state_dict: Mapping[str, Tensor], rename: Callable[[str], str | None],
              transform: Callable[[str, Tensor], Tensor]) -> LazyStateDict:
    """A lazy view of ``state_dict`` under new names (``rename`` -> None drops an entry), each tensor
    passed through ``transform(old_name, tensor)`` when it is looked up."""
    shapes = tensor_shapes(state_dict)
    entries: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = {}
    for old in state_dict:
        new = rename(old)
        if new is not None:
            entries[new] = (shapes[old], partial(_convert_one, state_dict, old, transform))
    return LazyStateDict(entries)


def _convert_one(state_dict: Mapping[str, Tensor], name: str, transform: Callable[[str, Tensor], Tensor]) -> Tensor:
    return transform(name, state_dict[name])


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies for tensors whose storage another entry (or a larger buffer) also uses: safetensors
    rejects shared storage, and a memory-mapped view's storage is the whole source file."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[k] = t if ptr not in seen and whole else t.contiguous().clone()
        seen.add(ptr)
    return out


def load_weights(folder: Path) -> tuple[dict[str, Tensor], list[Path]]:
    """Tensors of ``model.safetensors`` or of the shards its index lists, with the files read."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shard_of = read_safetensors_index(index)
        out: dict[str, Tensor] = {}
        files = sorted(set(shard_of.values()))
        for shard in files:
            out.update(read_safetensors(shard))
        return out, files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors (or {SAFETENSORS_INDEX}) with the weights")
    return read_safetensors(single), [single]


# ---------------------------------------------------------------- tokenizer files


def save_tokenizer(tokenizer: Any, folder: Path, config: ModelConfig) -> str | None:
    """Write ``tokenizer`` into ``folder`` so that both llamalab and transformers can load it.

    Returns the main file's name (``tokenizer.json`` or ``tokenizer.model``), None without a tokenizer.
    A ``tokenizers``-backed tokenizer is saved as ``tokenizer.json``; a SentencePiece or tiktoken
    one by copying its ``tokenizer.model``. ``tokenizer_config.json`` carries bos/eos and the chat
    template, which the model file formats cannot hold.
    """
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend", None)
    src = getattr(tokenizer, "path", None)
    if backend is not None and hasattr(backend, "to_str"):
        (folder / "tokenizer.json").write_text(backend.to_str())
        main, cls = "tokenizer.json", "PreTrainedTokenizerFast"
    elif src is not None and Path(src).is_file():
        shutil.copyfile(src, folder / "tokenizer.model")
        # transformers reads a SentencePiece tokenizer.model as LlamaTokenizer; a tiktoken
        # (Llama 3) rank file has no tokenizer class there, so none is claimed.
        is_sp = str(getattr(tokenizer, "name", "")).startswith("sentencepiece:")
        main, cls = "tokenizer.model", ("LlamaTokenizer" if is_sp else None)
    else:
        raise CheckpointError(f"cannot save tokenizer {getattr(tokenizer, 'name', type(tokenizer).__name__)}: "
                              f"it has neither a tokenizers backend nor a tokenizer.model file")

    def text(i: int | None) -> str | None:
        return None if i is None else tokenizer.decode([i])

    tok_config: dict[str, Any] = {
        "bos_token": text(tokenizer.bos_id),
        "eos_token": text(tokenizer.eos_id),
        "add_bos_token": bool(getattr(tokenizer, "add_bos_default", False)),
        "add_eos_token": False,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if cls is not None:
        tok_config = {"tokenizer_class": cls, **tok_config}
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None:
        tok_config["pad_token"] = text(pad)
    if getattr(tokenizer, "chat_template", None):
        tok_config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return main


def load_tokenizer_from(path: Path, checkpoint_path: Path) -> Any:
    """``llamalab.tokenizer.load_tokenizer(path)``, its errors restated as CheckpointError naming the checkpoint."""
    from llamalab.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(f"{checkpoint_path}: tokenizer could not be loaded: {e}") from None


# ---------------------------------------------------------------- the native format


def is_native_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by :func:`write_native`."""
    return path.is_dir() and (path / NATIVE_CONFIG).is_file()


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / NATIVE_CONFIG
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "llamalab":
        raise CheckpointError(f"{manifest_path}: expected a JSON object with \"format\": \"llamalab\"")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format_version {manifest['format_version']} is newer than this "
                              f"llamalab understands ({FORMAT_VERSION}); upgrade llamalab")
    return manifest


def read_native_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the whole manifest of a native checkpoint, without touching the weights."""
    manifest = _read_manifest(path)
    try:
        return ModelConfig.from_dict(manifest["config"]), manifest
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / NATIVE_CONFIG}: bad \"config\" ({e})") from None


def read_native(path: Path) -> Checkpoint:
    """Read a native checkpoint directory (weights memory-mapped)."""
    config, manifest = read_native_config(path)
    state_dict, files = load_weights(path)
    want = expected_shapes(config)
    if config.tie_embeddings and "tok_embeddings.weight" in state_dict:
        state_dict.setdefault("output.weight", state_dict["tok_embeddings.weight"])
    for name, t in state_dict.items():
        if name in want and tuple(t.shape) != want[name]:
            raise CheckpointError(f"{files[0] if len(files) == 1 else path}: tensor {name} has shape "
                                  f"{list(t.shape)}, expected {list(want[name])} for the config in {NATIVE_CONFIG}")
    tok_name = manifest.get("tokenizer")
    tokenizer = load_tokenizer_from(path / tok_name, path) if tok_name else None
    metadata = {"files": [str(f) for f in files], "tokenizer_path": str(path / tok_name) if tok_name else None,
                "source": manifest.get("source", {})}
    return Checkpoint(config=config, state_dict=state_dict, tokenizer=tokenizer, format="native", path=path,
                      metadata=metadata)


def write_native(checkpoint: Checkpoint, dst: Path, *, dtype: torch.dtype | None = None,
                 max_shard_size: int = _DEFAULT_MAX_SHARD) -> Path:
    """Write ``checkpoint`` as a native directory at ``dst`` (atomically); returns ``dst``."""
    config = checkpoint.config

    def keep(name: str) -> str | None:
        return None if config.tie_embeddings and name == "output.weight" else name  # stored once

    tensors = converted(checkpoint.state_dict, keep, lambda _name, t: t if dtype is None else t.to(dtype))
    with atomic_output_dir(dst) as tmp:
        write_safetensors(tensors, tmp, max_shard_size=max_shard_size)
        tok_name = save_tokenizer(checkpoint.tokenizer, tmp, config)
        source = {"format": checkpoint.format, "path": str(checkpoint.path)}
        if "quantization" in checkpoint.metadata:
            source["quantization"] = checkpoint.metadata["quantization"]
        manifest = {"format": "llamalab", "format_version": FORMAT_VERSION, "config": config.to_dict(),
                    "tokenizer": tok_name, "source": source}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(dst).expanduser().absolute()
