"""Training checkpoints: a round trip restores everything, old ones are pruned, partial ones ignored."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llamalab.checkpoint import read_checkpoint
from llamalab.checkpoint.base import CheckpointError
from llamalab.config import get_preset
from llamalab.model import Transformer
from llamalab.train.optim import build_optimizer, build_scheduler
from llamalab.train.state import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def setup(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", n_layers=1, **overrides))
    model.init_weights()
    opt = build_optimizer(model, lr=1e-2)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=20)
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        tokens = torch.randint(0, 256, (2, 9))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_restores_everything(tmp_path: Path, tied: bool) -> None:
    model, opt, sched = setup(tie_embeddings=tied)
    train_steps(model, opt, sched, 3)
    loader = {"epoch": 1, "positions": torch.tensor([5, 7]), "source": "web"}
    extra = {"config": {"optim": {"lr": 1e-2}}, "tokens_seen": 48}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, loader, extra, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-000003"
    after_save = draws()
    train_steps(model, opt, sched, 2)  # the original run goes on ...
    want_params = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = setup(seed=99, tie_embeddings=tied)  # ... a fresh process resumes it
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    step, loader2, extra2 = load_checkpoint(path, model2, opt2, sched2)
    assert (step, extra2) == (3, extra)
    assert loader2["epoch"] == 1 and torch.equal(loader2["positions"], loader["positions"])
    assert draws() == after_save  # RNG streams continue identically
    assert sched2.last_epoch == 3
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()
    train_steps(model2, opt2, sched2, 2)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, want_params[k], rtol=0, atol=0, msg=k)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for name, t in st.items():
            assert torch.equal(t, s2["state"][i][name]), (i, name)
    if tied:
        assert model2.output.weight is model2.tok_embeddings.weight


def test_weights_are_a_native_checkpoint(tmp_path: Path) -> None:
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, {}, keep_last=0)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "native" and ckpt.config == model.config
    torch.testing.assert_close(ckpt.state_dict["layers.0.attention.wq.weight"],
                               model.layers[0].attention.wq.weight.detach())


def test_keep_last_prunes_and_latest_is_newest(tmp_path: Path) -> None:
    model, opt, sched = setup()
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000040"
    save_checkpoint(tmp_path, 40, model, opt, sched, {"again": True}, {}, keep_last=2)  # re-save replaces
    assert load_checkpoint(latest_checkpoint(tmp_path), model)[1] == {"again": True}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000030", "step-000040"]


def test_partial_writes_are_never_latest(tmp_path: Path) -> None:
    model, opt, sched = setup()
    save_checkpoint(tmp_path, 5, model, opt, sched, {}, {}, keep_last=3)
    ckdir = tmp_path / "checkpoints"
    (ckdir / ".step-000009.tmp-abc123").mkdir()  # a crash during the write of step 9
    (ckdir / ".step-000009.tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    (ckdir / "step-000008").mkdir()  # a copied-in directory without its completion marker
    assert latest_checkpoint(tmp_path) == ckdir / "step-000005"
    with pytest.raises(CheckpointError, match="not a complete training checkpoint"):
        load_checkpoint(ckdir / "step-000008", model)

    class Boom(Exception):
        pass

    # An exception in the middle of a save leaves no step directory and no temp directory.
    def fail() -> dict:
        raise Boom

    opt.state_dict = fail  # type: ignore[method-assign]
    with pytest.raises(Boom):
        save_checkpoint(tmp_path, 6, model, opt, sched, {}, {}, keep_last=3)
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".step-000006")]
    assert not (ckdir / "step-000006").exists()
    assert latest_checkpoint(tmp_path) == ckdir / "step-000005"


def test_extra_must_be_json(tmp_path: Path) -> None:
    model, opt, sched = setup()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model, opt, sched, {}, {"t": torch.zeros(1)}, keep_last=1)
    assert latest_checkpoint(tmp_path) is None
