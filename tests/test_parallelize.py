"""Parallelism parity: FSDP2, TP, FSDP+TP, DDP and activation checkpointing against one process.

The 2-process layouts run under ``torchrun`` (gloo, CPU) in ``tests/parallel_worker.py``;
the 1-process reference and the single-process checks run here.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamalab.model import Transformer
from llamalab.train.parallelize import (
    build_mesh, clip_grad_norm_, export_full_state_dict, is_main_process, load_full_state_dict, load_sharded, parallelize,
)

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("parallel_worker", HERE / "parallel_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Launch the worker on 2 processes once; return its output directory and results."""
    out = tmp_path_factory.mktemp("parallel")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(HERE / "parallel_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out, json.loads((out / "results.json").read_text())


@functools.lru_cache(maxsize=None)
def _reference(tied: bool):
    """The 1-process run on the full global batch, with torch's own gradient clipping."""
    config = worker.tiny_config(tied)
    model = Transformer(config)
    model.load_state_dict(worker.initial_weights(config))
    losses, norms, _ = worker.train(model, worker.batches(), torch.nn.utils.clip_grad_norm_, lambda x: x)
    return losses, norms


@pytest.mark.parametrize("layout", ["fsdp", "tp", "fsdp_tp_selective_ac", "fsdp_full_ac", "ddp",
                                    "tp_tied_full_ac"])
def test_two_process_loss_curve_matches_one_process(two_process_run, layout):
    _, results = two_process_run
    ref_losses, ref_norms = _reference(tied=layout.startswith("tp_tied"))
    got = results[layout]
    assert len(got["losses"]) == worker.STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    # Gradient norms before clipping (clipping is active: MAX_NORM is below them).
    assert min(ref_norms) > worker.MAX_NORM
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref_norms), rtol=1e-4, atol=0)


def test_fsdp_checkpoint_loads_into_one_process(two_process_run):
    out, _ = two_process_run
    expected = torch.load(out / "fsdp_full.pt")
    config = worker.tiny_config()
    model = Transformer(config)
    opt = worker.make_optimizer(model)
    extra = load_sharded(out / "ckpt_fsdp", model, opt, extra={"step": 0})
    assert extra == {"step": worker.STEPS}
    got = export_full_state_dict(model)
    assert sorted(got) == sorted(expected)
    assert all(k.startswith(("tok_embeddings.", "layers.", "norm.", "output.")) for k in got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    # The optimizer state came along: AdamW's step count and moments for every parameter.
    states = list(opt.state.values())
    assert len(states) == len(list(model.parameters()))
    assert all(float(s["step"]) == worker.STEPS and s["exp_avg"].abs().sum() > 0 for s in states)


def test_checkpoint_resumes_under_another_layout(two_process_run):
    _, results = two_process_run
    r = results["resume_fsdp_as_fsdp_tp"]
    assert r["step"] == worker.STEPS and r["keys_equal"] and r["max_abs_diff"] == 0.0


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients_and_names(mode):
    config = worker.tiny_config()
    weights = worker.initial_weights(config)
    tokens = worker.batches()[0]

    def grads(model):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}

    plain = Transformer(config)
    plain.load_state_dict(weights)
    wrapped = parallelize(Transformer(config), None, dp_shard=False, activation_checkpointing=mode)
    wrapped.load_state_dict(weights)
    assert sorted(wrapped.state_dict()) == sorted(plain.state_dict())  # Meta names kept
    g_plain, g_wrapped = grads(plain), grads(wrapped)
    assert sorted(g_plain) == sorted(g_wrapped)
    for k in g_plain:
        torch.testing.assert_close(g_wrapped[k], g_plain[k], rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    n1 = clip_grad_norm_(a, 0.3)
    n2 = torch.nn.utils.clip_grad_norm_(b, 0.3)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_bad_options_are_rejected():
    model = Transformer(worker.tiny_config())
    with pytest.raises(ValueError, match="mixed_precision"):
        parallelize(model, None, dp_shard=False, mixed_precision="fp16")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        parallelize(model, None, dp_shard=False, activation_checkpointing="some")
    with pytest.raises(ValueError, match="bf16"):
        parallelize(model, None, dp_shard=False, mixed_precision="bf16")
    with pytest.raises(ValueError, match="mesh"):
        parallelize(model, None, dp_shard=True)


def test_bf16_fsdp_on_one_process_trains_close_to_fp32():
    """FSDP on a 1-rank mesh only applies the mixed-precision policy: bf16 compute, fp32 master weights."""
    assert not dist.is_initialized()
    try:
        mesh = build_mesh(1, tp=1)
        assert is_main_process() and mesh.mesh_dim_names == ("dp", "tp")
        config = worker.tiny_config()
        model = parallelize(Transformer(config), mesh, dp_shard=True, mixed_precision="bf16",
                            activation_checkpointing="selective")
        load_full_state_dict(model, worker.initial_weights(config))
        losses, _, _ = worker.train(model, worker.batches(), clip_grad_norm_, lambda x: x, steps=3)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        ref = _reference(tied=False)[0][:3]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-2, atol=0)
        assert losses != ref  # bf16 really was used
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
