"""AdamW groups, the learning-rate schedules against the formulas, and one AdamW step by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.config import get_preset
from llamalab.model import Transformer
from llamalab.train.optim import (
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    lr_at,
    param_groups,
)

PEAK = 3e-4


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", n_layers=1, **overrides))
    model.init_weights()
    return model


# ---------------------------------------------------------------- schedules


def test_cosine_schedule_key_steps() -> None:
    kw = dict(peak_lr=PEAK, warmup_steps=100, total_steps=1100, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(PEAK / 100)  # first update already moves
    assert lr_at(49, **kw) == pytest.approx(PEAK * 50 / 100)
    assert lr_at(99, **kw) == pytest.approx(PEAK)  # last warmup step
    assert lr_at(100, **kw) == pytest.approx(PEAK)  # cosine starts at the peak
    assert lr_at(600, **kw) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * 0.5)  # cos(pi/2) = 0
    t = (350 - 100) / 1000
    assert lr_at(350, **kw) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * t)))
    assert lr_at(1100, **kw) == pytest.approx(0.1 * PEAK)  # end: 10% of peak (LLaMA)
    assert lr_at(5000, **kw) == pytest.approx(0.1 * PEAK)  # beyond the end: stays there


def test_linear_anneal_schedule_key_steps() -> None:
    kw = dict(peak_lr=PEAK, warmup_steps=10, total_steps=210, min_lr_ratio=0.1, schedule="linear-anneal",
              anneal_steps=50)
    assert lr_at(0, **kw) == pytest.approx(PEAK / 10)
    assert lr_at(10, **kw) == pytest.approx(PEAK)
    assert lr_at(85, **kw) == pytest.approx(0.55 * PEAK)  # middle of the cosine (10 .. 160)
    assert lr_at(160, **kw) == pytest.approx(0.1 * PEAK)  # cosine end = anneal start
    assert lr_at(185, **kw) == pytest.approx(0.1 * PEAK * 25 / 50)  # halfway down the line
    assert lr_at(210, **kw) == 0.0
    assert lr_at(1000, **kw) == 0.0
    # Continuous at the joins.
    assert lr_at(161, **kw) == pytest.approx(0.1 * PEAK * 49 / 50)


@pytest.mark.parametrize("bad", [
    dict(warmup_steps=10, total_steps=10),
    dict(warmup_steps=-1, total_steps=10),
    dict(warmup_steps=1, total_steps=10, schedule="step"),
    dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5),
    dict(warmup_steps=1, total_steps=10, schedule="linear-anneal"),
    dict(warmup_steps=1, total_steps=10, schedule="linear-anneal", anneal_steps=10),
])
def test_schedule_rejects_bad_arguments(bad: dict) -> None:
    with pytest.raises(ValueError):
        lr_at(0, peak_lr=1.0, **bad)


def test_lambda_lr_follows_lr_at() -> None:
    model = tiny_model()
    opt = build_optimizer(model, lr=PEAK)
    sched = build_scheduler(opt, warmup_steps=3, total_steps=12, schedule="linear-anneal", anneal_steps=4)
    seen = []
    for _ in range(15):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        want = lr_at(step, peak_lr=PEAK, warmup_steps=3, total_steps=12, schedule="linear-anneal", anneal_steps=4)
        assert lrs == pytest.approx([want, want])
    # The lambda is not pickled into the state: the schedule comes from the config on resume.
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None, None] and state["last_epoch"] == 15


# ---------------------------------------------------------------- groups


def test_decay_groups_hold_exactly_the_matrices() -> None:
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    layer = [f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
    layer += [f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    assert decay["param_names"] == ["tok_embeddings.weight", *layer, "output.weight"]
    assert no_decay["param_names"] == ["layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight"]
    named = dict(model.named_parameters())
    for g in (decay, no_decay):
        assert all(p is named[n] for n, p in zip(g["param_names"], g["params"]))

    decay, _ = param_groups(model, 0.1, decay_embeddings=False)
    assert "tok_embeddings.weight" not in decay["param_names"]


def test_tied_embedding_is_one_parameter_in_one_group() -> None:
    model = tiny_model(tie_embeddings=True)
    decay, no_decay = param_groups(model, 0.1)
    names = decay["param_names"] + no_decay["param_names"]
    assert "tok_embeddings.weight" in names and "output.weight" not in names
    assert len({id(p) for g in (decay, no_decay) for p in g["params"]}) == sum(1 for _ in model.parameters())


# ---------------------------------------------------------------- one AdamW step by hand


def test_adamw_step_matches_manual_computation() -> None:
    model = tiny_model()
    lr, (b1, b2), wd, eps = 1e-2, (0.9, 0.95), 0.1, 1e-8
    opt = build_optimizer(model, lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        g = grads[name]
        m_hat = (1 - b1) * g / (1 - b1)  # bias-corrected first moment after one step
        v_hat = (1 - b2) * g * g / (1 - b2)
        decay = wd if p.ndim >= 2 else 0.0
        want = before[name] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=name)


def test_clip_grad_norm_returns_the_norm_before_clipping() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([p], 1.0).item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_grad_norm([p], None).item() == pytest.approx(5.0)  # measure only
    assert p.grad.norm().item() == pytest.approx(5.0)
