"""The pretraining loop end to end on a tiny model: it learns, exports a model that generates,
resumes bit-identically after SIGKILL, checkpoints and exits 0 on SIGTERM, skips and stops on
non-finite losses, and rejects bad configs with one line before any compute."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llamalab
from llamalab.cli import main
from llamalab.data import tokenize_files
from llamalab.generate.engine import GenerationConfig, Generator
from llamalab.tokenizer import train_sentencepiece
from llamalab.train.config import load_config
from llamalab.train.loop import train
from llamalab.train.metrics import read_metrics
from llamalab.train.state import latest_checkpoint, load_checkpoint

NAMES = ["the king", "a queen", "my lord", "the fool", "sweet lady", "good sir"]
VERBS = ["speaks to", "loves", "betrays", "follows", "greets", "mocks"]
OBJECTS = ["the crown", "his daughter", "the ghost", "her brother", "the people", "a stranger"]


def _document(rng: random.Random, lines: int) -> str:
    return "\n".join(f"{rng.choice(NAMES).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(lines))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread here and in the subprocesses (OMP_NUM_THREADS below): a tiny model gains
    nothing from two, and the in-process and subprocess runs must compute alike (bit-identical)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentencePiece tokenizer (320 pieces) and train/val shards of a small synthetic corpus."""
    root = tmp_path_factory.mktemp("pretrain-data")
    rng = random.Random(0)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": _document(rng, 20)}) + "\n" for _ in range(200)))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": _document(rng, 20)}) + "\n" for _ in range(20)))
    tok = train_sentencepiece([root / "train.jsonl"], root / "tok" / "tok", vocab_size=320)
    tokenize_files([root / "train.jsonl"], tok, root / "tokens" / "train", progress=False)
    tokenize_files([root / "val.jsonl"], tok, root / "tokens" / "val", progress=False)
    return root


def _run_file(data: Path, run_dir: Path, **sections: str) -> Path:
    """A run file for the tiny preset (vocab 320) on the fixture's shards; ``sections`` add lines."""
    extra = {"train": "", "eval": "", "checkpoint": "", **sections}
    text = f"""
run_dir = "{run_dir}"
seed = 1
[model]
preset = "tiny"
overrides = {{ vocab_size = 320, max_seq_len = 64 }}
[data]
val_shards = "{data / 'tokens' / 'val'}"
[data.sources.train]
shards = "{data / 'tokens' / 'train'}/*.json"
[train]
total_steps = 40
global_batch_tokens = 512
seq_len = 32
micro_batch_size = 8
precision = "fp32"
{extra['train']}
[optim]
lr = 3e-3
warmup_steps = 5
[eval]
every = 20
batches = 4
{extra['eval']}
[checkpoint]
every = 20
keep_last = 2
{extra['checkpoint']}
"""
    path = run_dir.with_suffix(".toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamalab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.005)


def test_tiny_run_learns_and_exports_a_model_that_generates(data: Path, tmp_path: Path) -> None:
    cfg = load_config(_run_file(data, tmp_path / "run"), ["train.global_batch_tokens=1024"])
    assert cfg.grad_accum_steps() == 4  # 1024 tokens = 4 micro-batches of 8 x 32
    summary = train(cfg, progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 40
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 2.0, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "rss_mb", "skipped_nonfinite", "tokens_seen"):
        assert key in records[-1], key
    assert records[-1]["tokens_seen"] == 40 * 1024
    assert "val_loss" in records[19] and "val_loss" in records[39]
    assert summary["val_loss"] < summary["unigram_entropy"] - 1.0
    # run_dir/final is a native checkpoint with the tokenizer the shards name in their metadata.
    lm = llamalab.load(tmp_path / "run" / "final")
    assert lm.tokenizer is not None and lm.config.vocab_size == 320
    gen = Generator(lm.model, lm.tokenizer)
    (result,) = gen.generate([lm.tokenizer.encode("The king", bos=True)], GenerationConfig(max_new_tokens=12))
    assert len(result.ids) == 12 and result.text.strip()
    # Running again finds the run complete and trains nothing.
    again = train(cfg, progress=False)
    assert again["status"] == "already complete" and again["steps"] == 40


def test_stages_change_length_and_rope_base(data: Path, tmp_path: Path) -> None:
    path = _run_file(data, tmp_path / "staged")
    path.write_text(path.read_text() + """
[[stages]]
start_tokens = 6144
seq_len = 64
micro_batch_size = 4
global_batch_tokens = 1024
rope_theta = 50000.0
""")
    summary = train(load_config(path, ["train.total_steps=16", "eval.every=8"]), progress=False)
    records = read_metrics(tmp_path / "staged")
    assert [r["stage"] for r in records] == [0] * 12 + [1] * 4
    assert records[-1]["tokens_seen"] == 12 * 512 + 4 * 1024 == summary["tokens_seen"]
    manifest = json.loads((tmp_path / "staged" / "final" / "llamalab.json").read_text())
    assert manifest["config"]["rope_theta"] == 50000.0


@pytest.mark.slow  # three 150-step runs, two of them CLI processes: ~22 s on 2 cores
def test_resume_after_sigkill_is_bit_identical(data: Path, tmp_path: Path) -> None:
    # 150 steps of 16 sequences cross the epoch boundary (~143 steps of the fixture's shards)
    steps = ["train.total_steps=150", "checkpoint.every=4", "eval.every=25"]
    # The reference saves no checkpoint (only the final one): checkpointing every 4 steps costs
    # ~4 s here, and the killed run must match a run that never saved or resumed at all.
    reference = train(load_config(_run_file(data, tmp_path / "ref"), [*steps, "checkpoint.every=0"]),
                      progress=False)
    assert reference["steps"] == 150

    config = _run_file(data, tmp_path / "killed")
    proc = _cli("pretrain", "--config", str(config), "--no-progress", *steps)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step-000008" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_metrics(tmp_path / "killed")[-1]["step"]
    assert killed_at < 150, "the run finished before it could be killed"

    proc = _cli("pretrain", "--config", str(config), "--no-progress", *steps)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming from" in err
    ref = read_metrics(tmp_path / "ref")
    resumed = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 151))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref]  # bit-identical floats
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in ref]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in ref]


def test_sigterm_saves_a_checkpoint_and_exits_0(data: Path, tmp_path: Path) -> None:
    config = _run_file(data, tmp_path / "term")
    proc = _cli("pretrain", "--config", str(config), "--no-progress", "train.total_steps=100000",
                "checkpoint.every=5", "eval.every=0")
    _wait_for(tmp_path / "term" / "checkpoints" / "step-000005" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "preempted" in out
    last_step = read_metrics(tmp_path / "term")[-1]["step"]
    ckpt = latest_checkpoint(tmp_path / "term")
    assert ckpt is not None and ckpt.name == f"step-{last_step:06d}"


def test_nonfinite_steps_are_skipped_and_counted(data: Path, tmp_path: Path) -> None:
    cfg = load_config(_run_file(data, tmp_path / "nan"), ["train.total_steps=10", "train.inject_nonfinite_at=[3, 5, 6]",
                                                          "eval.every=0"])
    summary = train(cfg, progress=False)
    assert summary["status"] == "completed" and summary["skipped_nonfinite"] == 3
    records = read_metrics(tmp_path / "nan")
    assert [r["loss"] is None for r in records] == [s in (3, 5, 6) for s in range(1, 11)]
    assert [r["skipped_nonfinite"] for r in records] == [0, 0, 1, 1, 2, 3, 3, 3, 3, 3]


def test_nonfinite_steps_in_a_row_stop_the_run(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _run_file(data, tmp_path / "stop")
    code = main(["pretrain", "--config", str(config), "--no-progress", "train.total_steps=40",
                 "train.inject_nonfinite_at=[7, 8, 9, 10]", "train.max_nonfinite_steps=3", "checkpoint.every=5",
                 "eval.every=0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite for 3 steps in a row" in err and "step-000005" in err
    assert read_metrics(tmp_path / "stop")[-1]["step"] == 9
    ckpt = latest_checkpoint(tmp_path / "stop")
    assert ckpt is not None and ckpt.name == "step-000005"
    model = llamalab.load(ckpt).model
    step, _loader, extra = load_checkpoint(ckpt, model)
    assert step == 5 and extra["skipped_nonfinite"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1e-3", "unknown key 'optim.lrr'"),
    ("train.global_batch_tokens=1000", "is not a multiple of seq_len * micro_batch_size"),
    ("data.sources.train.shards=/nonexistent/shards/*.json", "/nonexistent/shards/*.json"),
    ("model.overrides.vocab_size=256", "vocab_size 320 but the model has vocab_size 256"),
    ("data.tokenizer=/nonexistent/tok.model", "data.tokenizer='/nonexistent/tok.model': no such file"),
])
def test_bad_config_is_one_line_before_compute(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               override: str, expected: str) -> None:
    config = _run_file(data, tmp_path / "bad")
    code = main(["pretrain", "--config", str(config), "--no-progress", override])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_bad_config_from_the_command_line(data: Path, tmp_path: Path) -> None:
    proc = _cli("pretrain", "--config", str(_run_file(data, tmp_path / "bad")), "train.precision=fp8")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "train.precision" in err and "Traceback" not in err


def test_a_step_casts_each_weight_to_bf16_once_for_all_its_micro_batches(data: Path, tmp_path: Path) -> None:
    """Under bf16 autocast the trained weights are cast to bf16 once a step (one autocast region
    around the micro-batches; the weights change only at the optimizer step), not once a
    micro-batch: counted at the dispatcher over 2 steps of 4 micro-batches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import llamalab.train.loop as loop

    casts: list[int] = []
    watched: dict[int, str] = {}

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                if args[0].data_ptr() in watched:
                    casts.append(len(casts))
            return func(*args, **kwargs)

    real_optimizer = loop.build_optimizer

    def watching_optimizer(model, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        watched.update({p.data_ptr(): n for n, p in model.named_parameters() if n == "layers.0.attention.wq.weight"})
        return real_optimizer(model, *a, **kw)

    loop.build_optimizer = watching_optimizer
    try:
        cfg = load_config(_run_file(data, tmp_path / "run"), ["train.global_batch_tokens=1024", "train.total_steps=2",
                                                             "train.precision=bf16", "optim.warmup_steps=1",
                                                             "eval.every=0", "checkpoint.every=0"])
        assert cfg.grad_accum_steps() == 4
        with CountCasts():
            summary = train(cfg, progress=False)
    finally:
        loop.build_optimizer = real_optimizer
    assert summary["status"] == "completed" and watched
    assert len(casts) == 2, len(casts)  # one a step (it was one a micro-batch: 8)
