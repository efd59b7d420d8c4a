"""The fused, chunked output-head cross-entropy equals ``F.cross_entropy(h @ W.T, y)``: loss and both
gradients, with ignored targets, several chunks, tied weights and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalab.config import PRESETS
from llamalab.model import Transformer
from llamalab.train.loss import linear_cross_entropy


def _reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_loss_and_gradients_equal_unfused_cross_entropy(chunk: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 50, (3, 20), generator=g)
    y[0, :5] = -100  # ignored targets (e.g. prompt tokens) count neither in the sum nor in the mean
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    ref = _reference(h, w, y)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-9)


def test_tied_model_gradients_match_and_bf16_autocast_stays_close() -> None:
    config = PRESETS["tiny"]
    config = type(config)(**{**config.__dict__, "tie_embeddings": True})
    torch.manual_seed(0)
    a, b = Transformer(config), Transformer(config)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, config.vocab_size, (2, 33))
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fused = linear_cross_entropy(a.hidden_states(x[:, :-1]), a.output.weight, x[:, 1:], chunk_tokens=10)
            plain = F.cross_entropy(b(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        fused.backward()
        plain.backward()
        tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fused, plain, **tol)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
            p.grad = q.grad = None


def test_onednn_products_give_the_same_loss_and_gradients() -> None:
    from llamalab.train.speed import onednn_linear_available, onednn_mm_t

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(100, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 100, (40,), generator=g)
    loss = linear_cross_entropy(h, w, y, chunk_tokens=16, mm_t=onednn_mm_t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = _reference(h.double()[None], w.double(), y[None])
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 7])
def test_token_logprobs_and_gradients_equal_log_softmax(chunk: int | None) -> None:
    """``linear_token_logprobs`` against ``log_softmax(h @ W.T).gather(target)`` in float64: the values
    (0 at ignored targets) and the gradients of a loss that weighs each sequence's sum differently
    (as DPO does), so the per-token upstream gradients are not all equal."""
    from llamalab.train.loss import linear_token_logprobs

    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 9, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 50, (4, 9), generator=g)
    y[1, :4] = -100
    coef = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    got = linear_token_logprobs(h, w, y, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(torch.tanh(got.sum(1) * 0.1 * coef).sum(), (h, w))
    lp = torch.log_softmax(h @ w.T, dim=-1).gather(2, y.clamp(min=0).unsqueeze(2)).squeeze(2) * (y != -100)
    rh, rw = torch.autograd.grad(torch.tanh(lp.sum(1) * 0.1 * coef).sum(), (h, w))
    torch.testing.assert_close(got, lp, rtol=1e-9, atol=1e-9)
    assert float(got[1, :4].abs().max()) == 0.0
    torch.testing.assert_close(gh, rh, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-7, atol=1e-10)


def test_token_logprobs_under_bf16_autocast_stay_close_to_fp32() -> None:
    from llamalab.train.loss import linear_token_logprobs

    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 30, 32, generator=g).requires_grad_()
    w = (torch.randn(64, 32, generator=g) * 0.2).requires_grad_()
    y = torch.randint(0, 64, (2, 30), generator=g)
    ref = linear_token_logprobs(h, w, y)
    gh_ref, = torch.autograd.grad(ref.sum(), (h,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_logprobs(h, w, y, chunk_tokens=16)
    gh, = torch.autograd.grad(got.sum(), (h,))
    assert got.dtype == torch.float32 and gh.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gh, gh_ref, rtol=0.05, atol=0.05)


def test_frozen_head_gives_the_same_hidden_gradient() -> None:
    """LoRA freezes the head: the fused loss then skips the weight gradient, and the hidden
    states' gradient is still the unfused loss's."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 11, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(40, 16, generator=g, dtype=torch.float64)  # requires_grad False
    y = torch.randint(0, 40, (2, 11), generator=g)
    gh, = torch.autograd.grad(linear_cross_entropy(h, w, y, chunk_tokens=5), (h,))
    rh, = torch.autograd.grad(_reference(h, w, y), (h,))
    torch.testing.assert_close(gh, rh, rtol=1e-6, atol=1e-9)
