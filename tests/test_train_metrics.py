"""FLOPs per token by hand, the metrics trace on resume, and the plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalab.config import get_preset
from llamalab.model import Transformer
from llamalab.train.metrics import MetricsWriter, flops_per_token, mfu, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_by_hand(tied: bool) -> None:
    c = get_preset("tiny", tie_embeddings=tied)  # dim 64, 2 layers, 4 heads of 16, 2 KV heads, vocab 256
    hidden = c.ffn_hidden_dim
    per_layer = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + 3 * 64 * hidden + 2 * 64  # q k v o, w1 w2 w3, 2 norms
    n = 2 * per_layer + 64 + 256 * 64  # + final norm + output head (the input table is a lookup)
    assert flops_per_token(c, 128) == 6 * n + 12 * 2 * 64 * 128
    # N is every parameter of the built model except the input embedding table.
    model = Transformer(c)
    params = sum(p.numel() for p in model.parameters())
    assert n == params - (0 if tied else 256 * 64)


def test_flops_llama_7b_is_about_6n() -> None:
    c = get_preset("llama1-7b")
    f = flops_per_token(c, 2048)
    n = 6.74e9 - 32000 * 4096  # LLaMA-7B's 6.7B less the input embedding table
    assert f == pytest.approx(6 * n + 12 * 32 * 4096 * 2048, rel=0.002)
    assert mfu(1000.0, f, 989e12) == pytest.approx(1000 * f / 989e12)


def test_writer_resume_drops_lines_after_the_checkpoint(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 8):
            w.log(step, loss=torch.tensor(5.0 - step * 0.1), lr=1e-3)
        w.log(5, val_loss=4.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 4')  # the crashed run's torn last line
    with MetricsWriter(tmp_path, resume_step=5) as w:  # resumed from the step-5 checkpoint
        w.log(6, loss=float("nan"), lr=1e-3)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 5, 6]
    assert recs[0]["loss"] == pytest.approx(4.9) and recs[-1]["loss"] is None  # NaN -> null (strict JSON)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    with MetricsWriter(tmp_path) as w:  # without resume_step: plain append
        w.log(7, loss=1.0)
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [6, 7]


def _write_run(run: Path) -> None:
    with MetricsWriter(run) as w:
        for step in range(1, 41):
            w.log(step, loss=5.0 / step**0.3, lr=1e-3 * min(1.0, step / 10))
            if step % 10 == 0:
                w.log(step, val_loss=5.2 / step**0.3)


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    for p in paths:
        data = p.read_bytes()
        assert p.parent == run / "plots" and data[:8] == PNG_SIGNATURE
        width, height = struct.unpack(">II", data[16:24])  # IHDR
        assert width > 100 and height > 100 and len(data) > 1000
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_run(tmp_path / "empty")


def test_plot_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    out = subprocess.run([sys.executable, "-m", "llamalab.train.cli", "plot", str(run), "--out", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "p" / "loss.png"), str(tmp_path / "p" / "lr.png")]
    help_text = subprocess.run([sys.executable, "-m", "llamalab.train.cli", "plot", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "llamalab plot runs/tiny" in help_text


def test_tensorboard_scalars_read_back_by_tensorboards_own_reader(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, tensorboard=True) as w:
        for step in range(1, 6):
            w.log(step, loss=10.0 - step, lr=1e-3 * step, stage=0, note="text is not a scalar")
    # A resumed run (checkpoint at step 3) rewrites steps 4-5: the reader sees the new values.
    with MetricsWriter(tmp_path, resume_step=3, tensorboard=True) as w:
        for step in (4, 5):
            w.log(step, loss=100.0 + step, lr=0.5)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "stage"} <= set(acc.Tags()["scalars"])
    assert "note" not in acc.Tags()["scalars"]
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert loss == {1: 9.0, 2: 8.0, 3: 7.0, 4: 104.0, 5: 105.0}
    assert [r["loss"] for r in read_metrics(tmp_path)] == [9.0, 8.0, 7.0, 104.0, 105.0]
