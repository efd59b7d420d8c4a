"""`llamalab pretrain` under torchrun (2 processes, gloo, CPU): the FSDP2 run and the tensor-parallel
run follow the 1-process loss curve (relative difference <= 1e-4 per step), and a sharded (DCP)
checkpoint of the 2-process run resumes in ONE process onto the same curve and exports a
checkpoint that loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamalab
from llamalab.data import tokenize_files
from llamalab.tokenizer import train_sentencepiece
from llamalab.train.config import load_config
from llamalab.train.loop import train
from llamalab.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a small corpus and a run file for the tiny preset (4 heads, 2 KV heads: TP=2 splits them)."""
    root = tmp_path_factory.mktemp("dist-data")
    lines = [f"line {i}: the {w} sees the {v} at {i % 7} o'clock." for i, (w, v) in
             enumerate(zip(["king", "queen", "fool", "ghost"] * 100, ["crown", "sea", "moon", "rose", "tower"] * 80))]
    docs = ["\n".join(lines[i:i + 10]) for i in range(0, len(lines), 10)]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:4]))
    tok = train_sentencepiece([root / "train.jsonl"], root / "tok" / "tok", vocab_size=320)
    tokenize_files([root / "train.jsonl"], tok, root / "tokens" / "train", progress=False)
    tokenize_files([root / "val.jsonl"], tok, root / "tokens" / "val", progress=False)
    path = root / "run.toml"
    path.write_text(f"""
seed = 3
[model]
preset = "tiny"
overrides = {{ vocab_size = 320, max_seq_len = 64 }}
[data]
val_shards = "{root / 'tokens' / 'val'}"
[data.sources.train]
shards = "{root / 'tokens' / 'train'}/*.json"
[train]
total_steps = {STEPS}
global_batch_tokens = 1024
seq_len = 32
micro_batch_size = 8
precision = "fp32"
log_every = 1
[optim]
lr = 3e-3
warmup_steps = 2
[eval]
every = 0
[checkpoint]
every = 4
keep_last = 0
""")
    return path


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _torchrun(run_file: Path, run_dir: Path, *overrides: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "llamalab.cli", "pretrain", "--config", str(run_file),
           "--no-progress", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def reference(run_file: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The 1-process run on the same global batch (4 micro-batches of 8 x 32)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("ref") / "run"
        train(load_config(run_file, [f"run_dir={run_dir}"]), progress=False)
    finally:
        torch.set_num_threads(before)
    losses = _losses(run_dir)
    assert len(losses) == STEPS
    return losses


def _assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    rel = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    assert max(rel) <= 1e-4, list(zip(got, want))


def test_fsdp_run_follows_the_single_process_curve_and_resumes_on_one_process(
        run_file: Path, reference: list[float], tmp_path: Path) -> None:
    run_dir = tmp_path / "fsdp"
    _torchrun(run_file, run_dir)
    _assert_same_curve(_losses(run_dir), reference)
    assert (run_dir / "checkpoints" / "step-000004" / "dcp").is_dir()

    # Resume the 2-process (DCP) checkpoint of step 4 in ONE process: steps 5..8 follow the curve.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(run_dir / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    with (resumed / "metrics.jsonl").open("w") as f:
        for rec in read_metrics(run_dir):
            if rec.get("step", 0) <= 4:
                f.write(json.dumps(rec) + "\n")
    torch.set_num_threads(1)
    summary = train(load_config(run_file, [f"run_dir={resumed}"]), progress=False)
    assert summary["status"] == "completed"
    _assert_same_curve(_losses(resumed), reference)
    # ... and exports a single native checkpoint that loads and agrees with the 2-process export.
    a, b = llamalab.load(resumed / "final"), llamalab.load(run_dir / "final")
    tokens = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(tokens), b.model(tokens), rtol=1e-3, atol=1e-3)


def test_tensor_parallel_run_follows_the_single_process_curve(run_file: Path, reference: list[float],
                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "tp"
    _torchrun(run_file, run_dir, "train.tensor_parallel=2")
    _assert_same_curve(_losses(run_dir), reference)
    lm = llamalab.load(run_dir / "final")
    assert lm.config.n_heads == 4 and lm.tokenizer is not None


def test_tensor_parallel_that_does_not_divide_the_heads_is_rejected_before_compute(run_file: Path) -> None:
    from llamalab.train.config import ConfigError

    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(run_file, ["train.tensor_parallel=4"], world_size=4)
    with pytest.raises(ConfigError, match="divide the number of processes"):
        load_config(run_file, ["train.tensor_parallel=2"], world_size=3)


def test_fsdp_checkpoint_averaging_gives_the_single_process_mean(run_file: Path, tmp_path: Path) -> None:
    """Llama 3's averaged final model under FSDP: each sharded (DCP) checkpoint of the anneal is
    loaded into the sharded model and folded into the mean; the result is the 1-process run's."""
    from llamalab.checkpoint.native import load_weights

    anneal = ["optim.schedule=linear-anneal", "optim.anneal_steps=3", "checkpoint.average_anneal=true",
              "checkpoint.anneal_every=1"]
    torch.set_num_threads(1)
    one = tmp_path / "one"
    train(load_config(run_file, [f"run_dir={one}", *anneal]), progress=False)
    two = tmp_path / "two"
    _torchrun(run_file, two, *anneal)
    for name in ("final", "final-last"):
        a, _ = load_weights(one / name)
        b, _ = load_weights(two / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    mean, last = load_weights(two / "final")[0], load_weights(two / "final-last")[0]
    assert not torch.equal(mean["layers.0.attention.wq.weight"], last["layers.0.attention.wq.weight"])
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-000004", "step-000006", "step-000007", "step-000008"]
