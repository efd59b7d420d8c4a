"""Training checkpoints: everything a run needs to continue exactly where it stopped.

Layout, one directory per saved step::

    RUN_DIR/checkpoints/step-000123/
        llamalab.json          native manifest: {"format": "llamalab", "config": ModelConfig, ...}
        model.safetensors      the weights (Meta names; a tied head stored once)
        optimizer.pt           optimizer.state_dict()
        trainer.pt             scheduler state, loader state, Python/NumPy/torch(/CUDA) RNG states
        state.json             {"step": 123, "time": ..., "extra": {...}}; written last

The weights are a native llamalab checkpoint, so ``llamalab generate --model
RUN_DIR/checkpoints/step-000123`` (with ``--tokenizer``) and ``llamalab convert`` read them.
Each directory is written under a temporary name (``.step-000123.tmp-*``), fsynced and renamed
into place (:func:`llamalab.checkpoint.native.atomic_output_dir`), so a crash mid-write leaves
no ``step-*`` directory behind and :func:`latest_checkpoint` never returns a partial one.

This is the single-process format; sharded (FSDP) runs need ``torch.distributed.checkpoint``
for the model and optimizer, and per-rank RNG states.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llamalab.checkpoint.base import CheckpointError
from llamalab.checkpoint.native import (
    FORMAT_VERSION,
    NATIVE_CONFIG,
    atomic_output_dir,
    load_weights,
    write_safetensors,
)

__all__ = ["checkpoint_dir", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """``run_dir/checkpoints/step-{step:06d}``."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first. Temporary (``.step-*``)
    directories and any ``step-*`` directory without its ``state.json`` are skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                         "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None,
                    loader_state: dict[str, Any], extra: dict[str, Any], keep_last: int, *,
                    weights: dict[str, torch.Tensor] | None = None, keep_from: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step:06d}`` atomically, then keep the newest ``keep_last``
    complete checkpoints (0: keep all). Returns the directory.

    ``keep_from``: checkpoints of this step and later are never pruned (the anneal's, to average).

    ``weights``: what to store instead of the whole model's state dict (a LoRA run stores only
    its adapters); the manifest then says ``"partial": true``.

    ``loader_state`` may hold tensors and plain Python values; ``extra`` (the run config, counters)
    must be JSON-serialisable. Saving a step that already exists replaces it.
    """
    model = _unwrap(model)
    config = getattr(model, "config", None)
    try:
        extra_json = json.dumps({"step": step, "time": time.time(), "extra": extra}, indent=2)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: extra must be JSON-serialisable ({e})") from None
    partial = weights is not None
    state_dict = dict(weights) if partial else model.state_dict()
    if config is not None and config.tie_embeddings and not partial:
        state_dict.pop("output.weight", None)  # stored once, as tok_embeddings.weight
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    trainer = {"scheduler": scheduler.state_dict() if scheduler is not None else None,
               "loader": loader_state, "rng": _rng_state(), "step": step}

    dst = checkpoint_dir(run_dir, step)
    old = None
    if dst.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    with atomic_output_dir(dst) as tmp:
        write_safetensors(state_dict, tmp)
        manifest = {"format": "llamalab", "format_version": FORMAT_VERSION,
                    "config": config.to_dict() if config is not None else None, "tokenizer": None,
                    "source": {"format": "llamalab-train", "step": step}, "partial": partial}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(manifest, indent=2) + "\n")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / STATE_FILE).write_text(extra_json + "\n")  # last: marks the directory complete
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last > 0:
        for old_step, path in list_checkpoints(run_dir)[:-keep_last]:
            if keep_from is None or old_step < keep_from:
                shutil.rmtree(path, ignore_errors=True)
    return dst


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, *, restore_rng: bool = True,
                    apply_weights: Any | None = None) -> tuple[int, dict[str, Any], dict]:
    """Restore a checkpoint into ``model`` (and ``optimizer``, ``scheduler`` when given) and the
    global RNG states; returns ``(step, loader_state, extra)``. ``apply_weights(model, weights,
    source)`` puts the stored weights into the model (default: a strict ``load_state_dict``)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    meta = json.loads((path / STATE_FILE).read_text())
    model = _unwrap(model)
    weights, _files = load_weights(path)
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings and "tok_embeddings.weight" in weights:
        weights.setdefault("output.weight", weights["tok_embeddings.weight"])
    try:
        if apply_weights is not None:
            apply_weights(model, weights, str(path))
        else:
            model.load_state_dict(weights, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    if optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise CheckpointError(f"{path}: no optimizer.pt (saved without an optimizer)")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if restore_rng:
        _set_rng_state(trainer["rng"])
    return int(meta["step"]), trainer["loader"], meta["extra"]
