"""Worker for tests/test_parallelize.py, launched as ``torchrun --nproc_per_node 2 tests/parallel_worker.py OUT``.

Trains a tiny Transformer for a few steps under several parallel layouts on the same
global batches and writes each layout's per-step losses and gradient norms to
``OUT/results.json`` (rank 0). The FSDP run also leaves a sharded checkpoint in
``OUT/ckpt_fsdp`` and its full weights in ``OUT/fsdp_full.pt``. The helpers at the
top are imported by the test for the 1-process reference run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llamalab.config import ModelConfig
from llamalab.model import Transformer

STEPS = 10
BATCH = 8
SEQLEN = 16
MAX_NORM = 0.5


def tiny_config(tied: bool = False) -> ModelConfig:
    """dim 64, 2 layers, 4 heads, 2 KV heads, vocabulary 128."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=128,
                       max_seq_len=SEQLEN, tie_embeddings=tied)


def initial_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The seeded starting weights every layout loads."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches() -> torch.Tensor:
    """``(STEPS, BATCH, SEQLEN + 1)`` fixed token ids: the same global batches for every layout."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (STEPS, BATCH, SEQLEN + 1), generator=g)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def train(model, data, clip, reduce_mean, dp_rank: int = 0, dp_size: int = 1, steps: int = STEPS):
    """Run the steps; each dp rank takes its slice of every global batch. Returns (losses, norms, optimizer)."""
    opt = make_optimizer(model)
    losses, norms = [], []
    per_rank = BATCH // dp_size
    for step in range(steps):
        tokens = data[step, dp_rank * per_rank:(dp_rank + 1) * per_rank]
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        norms.append(float(clip(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(reduce_mean(loss.detach())))
    return losses, norms, opt


def main(out: Path) -> None:
    import torch.distributed as dist

    from llamalab.train.parallelize import (
        all_reduce_mean, build_mesh, clip_grad_norm_, data_parallel_rank_and_size, export_full_state_dict,
        init_distributed, is_main_process, load_full_state_dict, load_sharded, parallelize, save_sharded,
    )

    _, world, _ = init_distributed()
    data = batches()
    results = {}
    layouts = {
        # name: (tp size, parallelize kwargs, tied embeddings)
        "fsdp": (1, dict(dp_shard=True, tp=False), False),
        "tp": (2, dict(dp_shard=False, tp=True), False),
        "fsdp_tp_selective_ac": (2, dict(dp_shard=True, tp=True, activation_checkpointing="selective"), False),
        "fsdp_full_ac": (1, dict(dp_shard=True, tp=False, activation_checkpointing="full"), False),
        "ddp": (1, dict(dp_shard=False, tp=False), False),
        "tp_tied_full_ac": (2, dict(dp_shard=False, tp=True, activation_checkpointing="full"), True),
    }
    only = os.environ.get("PARALLEL_WORKER_LAYOUTS")  # e.g. "fsdp,fsdp_tp_selective_ac" for 4 processes
    if only:
        layouts = {k: v for k, v in layouts.items() if k in only.split(",") or k == "fsdp"}
    for name, (tp, kwargs, tied) in layouts.items():
        config = tiny_config(tied)
        mesh = build_mesh(world, tp)
        # The recommended flow: build on meta, parallelize, materialize, load weights, rebuild buffers.
        with torch.device("meta"):
            model = Transformer(config)
        parallelize(model, mesh, **kwargs)
        model.to_empty(device="cpu")
        load_full_state_dict(model, initial_weights(config))
        model.init_buffers("cpu")
        dp_rank, dp_size = data_parallel_rank_and_size(mesh)
        losses, norms, opt = train(model, data, clip_grad_norm_, all_reduce_mean, dp_rank, dp_size)
        results[name] = {"losses": losses, "norms": norms}
        if name == "fsdp":
            save_sharded(out / "ckpt_fsdp", model, opt, extra={"step": STEPS})
            full = export_full_state_dict(model)
            if is_main_process():
                torch.save(full, out / "fsdp_full.pt")
    # Resume the FSDP checkpoint under a different layout (FSDP + TP, TP over 2 processes).
    config = tiny_config()
    mesh = build_mesh(world, 2)
    with torch.device("meta"):
        model = Transformer(config)
    parallelize(model, mesh, dp_shard=True, tp=True)
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    opt = make_optimizer(model)
    extra = load_sharded(out / "ckpt_fsdp", model, opt, extra={"step": 0})
    full = export_full_state_dict(model)
    if is_main_process():
        expected = torch.load(out / "fsdp_full.pt")
        results["resume_fsdp_as_fsdp_tp"] = {
            "step": extra["step"],
            "max_abs_diff": max(float((full[k] - expected[k]).abs().max()) for k in expected),
            "keys_equal": sorted(full) == sorted(expected),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
