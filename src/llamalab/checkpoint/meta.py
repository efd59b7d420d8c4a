"""Meta's release layout: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

A Meta checkpoint folder holds::

    params.json              hyper-parameters (``ModelArgs`` keyword arguments)
    consolidated.00.pth      one state dict per model-parallel rank
    ...
    checklist.chk            md5 sums, "<md5>  <filename>" per line (optional)
    tokenizer.model          here, or in the parent folder (LLaMA 1 releases)

Each shard holds the slice that one rank of Meta's model-parallel code
(fairscale's layers) owns:

* column-parallel layers (``wq wk wv w1 w3 output``) split their output features: dim 0;
* row-parallel layers (``wo w2``) split their input features: dim 1;
* ``tok_embeddings`` is a ``ParallelEmbedding`` in LLaMA 1/2 (split on the embedding dim,
  dim 1) but a ``VocabParallelEmbedding`` in Llama 3 (split on the vocabulary, dim 0);
  the reader tells them apart from the shard shapes;
* norms are replicated.

Reading never holds two copies of the weights: every shard is memory-mapped and
:class:`ShardedStateDict` concatenates one tensor when it is looked up, then tells the
kernel it may drop the mapped pages it read (they are clean pages of a read-only private
mapping, re-read from the file if touched again). Reading plus
:func:`~llamalab.checkpoint.base.build_model` thus peaks near the size of the built model.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llamalab.checkpoint.base import Checkpoint, CheckpointError, check_state_dict, expected_shapes
from llamalab.checkpoint.convert import config_from_meta_params, config_to_meta_params
from llamalab.config import ModelConfig
from llamalab.fsutil import fsync_path

__all__ = ["ShardedStateDict", "is_meta_dir", "md5_file", "read_meta", "shard_dim", "shard_name", "write_meta"]

PARAMS = "params.json"
CHECKLIST = "checklist.chk"
TOKENIZER = "tokenizer.model"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")

# Per-layer weights by how fairscale's layers in Meta's model.py split them.
_COLUMN_PARALLEL = frozenset({"attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                              "feed_forward.w1.weight", "feed_forward.w3.weight"})
_ROW_PARALLEL = frozenset({"attention.wo.weight", "feed_forward.w2.weight"})


def shard_name(index: int) -> str:
    """File name of model-parallel shard ``index`` (Meta writes two digits)."""
    return f"consolidated.{index:02d}.pth"


def shard_dim(name: str, *, vocab_parallel_embedding: bool = False) -> int | None:
    """The dimension Meta's model-parallel code splits weight ``name`` along; None if replicated."""
    if name == "output.weight":
        return 0
    if name == "tok_embeddings.weight":
        return 0 if vocab_parallel_embedding else 1
    suffix = name.split(".", 2)[2] if name.startswith("layers.") and name.count(".") >= 2 else name
    if suffix in _COLUMN_PARALLEL:
        return 0
    if suffix in _ROW_PARALLEL:
        return 1
    return None


def _shard_files(folder: Path) -> list[Path]:
    """``consolidated.NN.pth`` files in rank order; CheckpointError if there are none or one is missing."""
    found: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth shard files; a Meta checkpoint folder holds "
                              f"consolidated.00.pth (and .01, .02 ... for model-parallel checkpoints)")
    n = max(found) + 1
    missing = [shard_name(i) for i in range(n) if i not in found]
    if missing:
        present = ", ".join(found[i].name for i in sorted(found))
        raise CheckpointError(f"{folder}: found {present} but not {', '.join(missing)}; expected {n} shards "
                              f"numbered 00 to {n - 1:02d}")
    return [found[i] for i in range(n)]


def is_meta_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding ``params.json`` and at least one ``consolidated.NN.pth``."""
    p = Path(path)
    if not p.is_dir() or not (p / PARAMS).is_file():
        return False
    return any(_SHARD_RE.match(q.name) for q in p.iterdir())


# ---------------------------------------------------------------- checksums


def md5_file(path: Path, chunk_size: int = 1 << 23) -> str:
    """Hex md5 of a file, streamed in ``chunk_size`` pieces (checkpoints can be far larger than RAM)."""
    h = hashlib.md5(usedforsecurity=False)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _verify_checklist(folder: Path) -> list[str]:
    """Check every file listed in ``checklist.chk``; return the names verified."""
    chk = folder / CHECKLIST
    verified = []
    for lineno, line in enumerate(chk.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not _MD5_RE.match(parts[0]):
            raise CheckpointError(f"{chk}:{lineno}: expected '<md5>  <filename>', found {line!r}")
        expected = parts[0].lower()
        # md5sum marks binary mode with a leading '*'; names are relative to the folder.
        name = parts[1].strip().lstrip("*")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{chk}:{lineno}: file name {name!r} must be relative to {folder}")
        target = folder / rel
        if not target.is_file():
            raise CheckpointError(f"{target}: listed in {chk} but missing")
        actual = md5_file(target)
        if actual != expected:
            raise CheckpointError(f"{target}: md5 checksum is {actual}, expected {expected} (from {chk}); "
                                  f"the file is corrupt or incomplete")
        verified.append(name)
    return verified


# ---------------------------------------------------------------- releasing mapped pages


def _find_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _find_madvise()
_MADV_DONTNEED = 4  # Linux value


def _drop_pages(t: Tensor) -> None:
    """Let the kernel reclaim the pages of a memory-mapped tensor that has been copied out.

    Pages of a file mapping stay resident (and count in RSS) after they are read; without
    this, reading every shard once would leave the whole checkpoint resident beside the
    built model. Only pages wholly inside the tensor's storage are dropped, and only clean
    ones exist here (the mapping is private and never written), so a later access simply
    reads the file again.
    """
    if _MADVISE is None:
        return
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)


# ---------------------------------------------------------------- reading


class ShardedStateDict(Mapping[str, Tensor]):
    """Meta-named weights merged from model-parallel shards one tensor at a time.

    Looking a name up concatenates that tensor's slices from every shard into a new tensor
    (in the shards' dtype) and releases the pages read; nothing is cached, so each lookup
    builds the tensor again. ``load`` does the same straight into another dtype and device,
    and ``shapes()`` gives the merged shapes without reading data.
    """

    def __init__(self, shards: list[dict[str, Tensor]], dims: dict[str, int | None],
                 shapes: dict[str, tuple[int, ...]], *, mmapped: bool) -> None:
        self._shards = shards
        self._dims = dims
        self._shapes = shapes
        self._mmapped = mmapped

    def load(self, name: str, *, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> Tensor:
        """Merge tensor ``name`` into a new tensor of ``dtype`` (default: the shards') on ``device``."""
        if name not in self._dims:
            raise KeyError(name)
        parts = [sd[name] for sd in self._shards]
        dim = self._dims[name]
        out = torch.empty(self._shapes[name], dtype=dtype or parts[0].dtype, device=device)
        if dim is None:
            out.copy_(parts[0])
        else:
            offset = 0
            for p in parts:
                out.narrow(dim, offset, p.shape[dim]).copy_(p)
                offset += p.shape[dim]
        # The data is copied out of the mapping, so its pages can be released right away.
        if self._mmapped:
            for p in parts:
                _drop_pages(p)
        return out

    def __getitem__(self, name: str) -> Tensor:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._dims)

    def __len__(self) -> int:
        return len(self._dims)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would build the tensor to answer.
        return name in self._dims

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Merged shape of every tensor, from the shard metadata alone."""
        return dict(self._shapes)

    @property
    def n_shards(self) -> int:
        """Number of model-parallel shards merged."""
        return len(self._shards)


def _load_shard(path: Path) -> tuple[dict[str, Tensor], bool]:
    """One shard's state dict, memory-mapped when the file is a zip-format torch.save file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    # Zip files (torch >= 1.6 format) can be mapped; older pickles must be read whole.
    mmapped = magic == b"PK\x03\x04"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmapped)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError ... for bad files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                              f"the file is truncated or corrupt") from e
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if not k.endswith("rope.freqs")}, mmapped


def _find_tokenizer(folder: Path) -> Path | None:
    # tokenizer.json: llamalab writes one where the source had no tokenizer.model (an HF fast tokenizer).
    for candidate in (folder / TOKENIZER, folder / "tokenizer.json", folder.parent / TOKENIZER):
        if candidate.is_file():
            return candidate
    return None


def _load_tokenizer(path: Path) -> Any:
    from llamalab.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as e:  # the tokenizer module's own errors name the file already
        raise CheckpointError(f"{path}: cannot load the tokenizer beside this Meta checkpoint ({e})") from e


def _embedding_split(shape0: tuple[int, ...], full: tuple[int, ...], n: int, params: dict[str, Any],
                     file: Path) -> bool:
    """Whether ``tok_embeddings`` is split on the vocabulary (Llama 3) rather than the embedding dim."""
    vocab, dim = full
    by_dim = vocab == shape0[0] and dim % n == 0 and shape0[1] == dim // n
    by_vocab = dim == shape0[1] and vocab % n == 0 and shape0[0] == vocab // n
    if by_dim and by_vocab:
        # Only when vocab_size == dim: the shapes cannot tell, so go by the generation (Llama 3
        # is the one with theta 500000 and VocabParallelEmbedding).
        return float(params.get("rope_theta", 10000.0)) >= 500000.0
    if by_dim or by_vocab:
        return by_vocab
    raise CheckpointError(f"{file}: tensor tok_embeddings.weight has shape {list(shape0)}, expected "
                          f"{[vocab, dim // n]} (embedding dim split {n} ways, LLaMA 1/2) or "
                          f"{[vocab // n, dim]} (vocabulary split {n} ways, Llama 3) of the full {[vocab, dim]}")


def _validate(files: list[Path], shards: list[dict[str, Tensor]], config: ModelConfig,
              params: dict[str, Any]) -> tuple[dict[str, int | None], dict[str, tuple[int, ...]], bool]:
    """Check names and per-shard shapes; return split dims, merged shapes, and the embedding split."""
    full = expected_shapes(config)
    n = len(shards)
    for file, sd in zip(files, shards):
        missing = [k for k in full if k not in sd]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"{file}: missing tensor(s) {', '.join(missing[:3])}{more}")
        unexpected = sorted(set(sd) - set(full))
        if unexpected:
            raise CheckpointError(f"{file}: unexpected tensor(s) {', '.join(unexpected[:3])}; expected the "
                                  f"weights of a LLaMA model with {config.n_layers} layers")
    # The shard count is not in params.json; a column-parallel weight's rows say what it was.
    ref = "layers.0.attention.wq.weight" if config.n_layers else "output.weight"
    rows, full_rows = shards[0][ref].shape[0], full[ref][0]
    if rows == 0 or full_rows % rows:
        raise CheckpointError(f"{files[0]}: tensor {ref} has {rows} rows, which is not a 1/N share of the "
                              f"full {full_rows}")
    implied = full_rows // rows
    if implied != n:
        raise CheckpointError(f"{files[0].parent}: tensor shapes imply {implied} model-parallel shard(s) "
                              f"({ref} in {files[0].name} has {rows} of {full_rows} rows) but {n} shard file(s) "
                              f"were found: {', '.join(f.name for f in files)}")
    vocab_parallel = n > 1 and _embedding_split(tuple(shards[0]["tok_embeddings.weight"].shape),
                                                full["tok_embeddings.weight"], n, params, files[0])
    dims = {name: shard_dim(name, vocab_parallel_embedding=vocab_parallel) for name in full}
    for name, shape in full.items():
        d = dims[name]
        want = list(shape)
        how = "replicated"
        if d is not None:
            if shape[d] % n:
                raise CheckpointError(f"{files[0].parent}: tensor {name} of full shape {list(shape)} cannot be "
                                      f"split {n} ways on dim {d}")
            want[d] = shape[d] // n
            how = f"the full {list(shape)} split {n} ways on dim {d}" if n > 1 else "for this config"
        for file, sd in zip(files, shards):
            got = list(sd[name].shape)
            if got != want:
                raise CheckpointError(f"{file}: tensor {name} has shape {got}, expected {want} ({how})")
    # Replicated tensors are small (norms): check the copies agree rather than trust shard 0.
    for name, d in dims.items():
        if d is None:
            for file, sd in zip(files[1:], shards[1:]):
                if not torch.equal(sd[name], shards[0][name]):
                    raise CheckpointError(f"{file}: replicated tensor {name} differs from the copy in "
                                          f"{files[0].name}; every shard should hold the same values")
    return dims, full, vocab_parallel


def read_meta(path: str | os.PathLike[str], *, verify_checksums: bool = True) -> Checkpoint:
    """Read a Meta release folder into a :class:`Checkpoint` whose state dict merges shards lazily.

    ``checklist.chk`` is verified when present (unless ``verify_checksums`` is False).
    ``tokenizer.model`` is looked for in the folder, then in its parent (LLaMA 1's layout);
    a ``vocab_size`` of -1 in ``params.json`` is taken from it, or failing that from the
    shapes of ``output.weight``. Every problem raises CheckpointError naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected a Meta checkpoint folder with {PARAMS} and "
                              f"consolidated.NN.pth files")
    params_path = folder / PARAMS
    if not params_path.is_file():
        raise CheckpointError(f"{params_path}: missing; a Meta checkpoint folder holds {PARAMS} beside its "
                              f"consolidated.NN.pth files")
    try:
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{params_path}: not valid JSON ({e})") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path}: expected a JSON object of model hyper-parameters")
    files = _shard_files(folder)

    checksums = "absent"
    if (folder / CHECKLIST).is_file():
        checksums = "skipped"
        if verify_checksums:
            _verify_checklist(folder)
            checksums = "verified"

    tok_path = _find_tokenizer(folder)
    tokenizer = _load_tokenizer(tok_path) if tok_path is not None else None

    loaded = [_load_shard(f) for f in files]
    shards = [sd for sd, _ in loaded]
    mmapped = all(m for _, m in loaded)

    vocab_source = "params.json"
    vocab: int | None = None
    if not isinstance(params.get("vocab_size"), int) or params["vocab_size"] <= 0:
        if tokenizer is not None:
            vocab, vocab_source = int(tokenizer.vocab_size), str(tok_path)
        elif "output.weight" in shards[0]:
            # The head is column-parallel in every generation: its rows times the shard count.
            vocab, vocab_source = shards[0]["output.weight"].shape[0] * len(shards), "output.weight"
    try:
        config = config_from_meta_params(params, vocab_size=vocab)
    except KeyError as e:
        raise CheckpointError(f"{params_path}: missing key {e}; expected dim, n_layers, n_heads ...") from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{params_path}: {e}") from e

    dims, shapes, vocab_parallel = _validate(files, shards, config, params)
    state_dict = ShardedStateDict(shards, dims, shapes, mmapped=mmapped)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for sd in shards for t in sd.values()})
    metadata = {
        "params": params,
        "n_shards": len(files),
        "shard_files": [f.name for f in files],
        "embedding_split": None if len(files) == 1 else ("vocab" if vocab_parallel else "dim"),
        "tokenizer_path": str(tok_path) if tok_path else None,
        "vocab_size_from": vocab_source,
        "checksums": checksums,
        "dtypes": dtypes,
        "mmap": mmapped,
    }
    return Checkpoint(config=config, state_dict=state_dict, tokenizer=tokenizer, format="meta", path=folder,
                      metadata=metadata)


# ---------------------------------------------------------------- writing


def _check_splittable(config: ModelConfig, n: int, vocab_parallel_embedding: bool, dst: Path) -> None:
    """Meta's model-parallel layers need every split width divisible by the shard count."""
    if n < 1:
        raise CheckpointError(f"{dst}: n_shards must be at least 1, got {n}")
    needs = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn hidden dim": config.ffn_hidden_dim,
             "vocab_size": config.vocab_size}
    if not vocab_parallel_embedding:
        needs["dim"] = config.dim
    bad = [f"{k}={v}" for k, v in needs.items() if v % n]
    if bad:
        raise CheckpointError(f"{dst}: cannot split into {n} model-parallel shards: {', '.join(bad)} "
                              f"not divisible by {n}")


def write_meta(config: ModelConfig, state_dict: Mapping[str, Tensor], dst: str | os.PathLike[str], *,
               n_shards: int = 1, tokenizer_path: str | os.PathLike[str] | None = None,
               dtype: torch.dtype | None = None, vocab_parallel_embedding: bool = False,
               overwrite: bool = False, tokenizer: Any | None = None) -> Path:
    """Write a Meta release folder that Meta's own ``model.py`` loads with ``n_shards`` ranks.

    ``state_dict`` uses Meta's names (a tied model's head may be omitted: ``output.weight``
    is written explicitly, as Meta's model has no tying). Each ``consolidated.NN.pth`` holds
    the slice rank NN owns (see the module docstring); ``tok_embeddings`` is split on the
    embedding dim as LLaMA 1/2's ``ParallelEmbedding`` expects, or on the vocabulary with
    ``vocab_parallel_embedding=True`` for Llama 3's code. Tensors keep their dtype unless
    ``dtype`` is given (Meta ships bf16: pass ``torch.bfloat16`` to match). The tokenizer
    file is copied in and ``checklist.chk`` lists the md5 of every file. A ``tokenizer`` object
    without a ``tokenizer.model`` (a ``tokenizers`` one) is saved as ``tokenizer.json`` +
    ``tokenizer_config.json`` instead: Meta's code cannot read it, llamalab and transformers can.

    The folder appears atomically: it is written beside ``dst`` under a temporary name,
    fsynced, then renamed. An existing ``dst`` is an error unless ``overwrite``.
    Returns ``dst``.
    """
    dst = Path(dst)
    # A plain dict up front: a lazy mapping (another checkpoint's) is then built once, not once per shard.
    sd: dict[str, Tensor] = dict(state_dict)
    if "output.weight" not in sd and config.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(sd, config, dst)
    _check_splittable(config, n_shards, vocab_parallel_embedding, dst)
    try:
        params = config_to_meta_params(config)
    except ValueError as e:
        raise CheckpointError(f"{dst}: {e}") from e
    tok_src = Path(tokenizer_path) if tokenizer_path is not None else None
    if tok_src is not None and not tok_src.is_file():
        raise CheckpointError(f"{tok_src}: tokenizer file not found")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        written: list[Path] = []
        params_file = tmp / PARAMS
        params_file.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        written.append(params_file)
        for rank in range(n_shards):
            shard = {}
            for name, t in sd.items():
                d = shard_dim(name, vocab_parallel_embedding=vocab_parallel_embedding)
                piece = t if d is None else t.narrow(d, rank * (t.shape[d] // n_shards), t.shape[d] // n_shards)
                # A fresh contiguous copy: torch.save stores a view's whole storage, not the view.
                shard[name] = piece.to(dtype=dtype or t.dtype, device="cpu", copy=True,
                                       memory_format=torch.contiguous_format)
            shard_file = tmp / shard_name(rank)
            with open(shard_file, "wb") as f:
                torch.save(shard, f)
                f.flush()
                os.fsync(f.fileno())
            del shard
            written.append(shard_file)
        if tok_src is not None:
            tok_file = tmp / TOKENIZER
            shutil.copyfile(tok_src, tok_file)
            fsync_path(tok_file)
            written.append(tok_file)
        elif tokenizer is not None:
            from llamalab.checkpoint.native import save_tokenizer

            main = save_tokenizer(tokenizer, tmp, config)
            for name in (main, "tokenizer_config.json"):
                if name and (tmp / name).is_file():
                    fsync_path(tmp / name)
                    written.append(tmp / name)
        lines = [f"{md5_file(p)}  {p.name}" for p in written]
        chk = tmp / CHECKLIST
        chk.write_text("\n".join(lines) + "\n", encoding="utf-8")
        fsync_path(chk)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a release folder is readable like any other
        fsync_path(tmp)
        if dst.exists():
            # Move the old folder aside first: a directory cannot be renamed over a non-empty one.
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / dst.name)
            try:
                os.replace(tmp, dst)
            except OSError:
                os.replace(old / dst.name, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
