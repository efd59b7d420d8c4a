"""Training-speed levers (train/speed.py): same results as the plain model, names kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalab.config import get_preset
from llamalab.model import Transformer
from llamalab.train import speed
from llamalab.train.optim import build_optimizer

pytestmark = pytest.mark.skipif(not speed.onednn_linear_available(), reason="no oneDNN linear op")


def _pair() -> tuple[Transformer, Transformer]:
    config = get_preset("tiny")
    torch.manual_seed(0)
    a = Transformer(config)
    a.init_weights()
    b = Transformer(config)
    b.load_state_dict(a.state_dict())
    return a, b


def _loss(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def test_onednn_linear_matches_plain_model_in_training() -> None:
    plain, fast = _pair()
    n = speed.use_onednn_linear(fast)
    assert n == 7 * fast.config.n_layers + 1  # 7 per block + the head
    assert list(fast.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, plain.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    opts = [build_optimizer(m, lr=1e-3) for m in (plain, fast)]
    for _ in range(2):
        for model, opt in zip((plain, fast), opts):
            _loss(model, tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_onednn_linear_falls_back_under_autocast() -> None:
    plain, fast = _pair()
    speed.use_onednn_linear(fast)
    tokens = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fast(tokens), plain(tokens))


def test_tied_embeddings_stay_tied() -> None:
    config = get_preset("tiny", tie_embeddings=True)
    model = Transformer(config)
    speed.use_onednn_linear(model)
    assert model.output.weight is model.tok_embeddings.weight


def test_adamw_impls_and_sdpa_backend() -> None:
    assert speed.adamw_impl_kwargs("fused") == {"fused": True}
    assert speed.adamw_impl_kwargs("default") == {}
    with pytest.raises(ValueError):
        speed.adamw_impl_kwargs("apex")
    q = torch.randn(1, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    for name in ("math", "flash", None):
        with speed.sdpa_backend(name):
            torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q, is_causal=True), ref)
    with pytest.raises(ValueError):
        with speed.sdpa_backend("cudnn-fast"):
            pass


@pytest.mark.parametrize("doc_masked", [False, True])
def test_grouped_matmul_attention_equals_sdpa(doc_masked: bool) -> None:
    """The products' attention (fp32, so the comparison is tight) equals SDPA with GQA (3 query
    heads per key/value head), causal and under a document mask, values and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 16, generator=g, requires_grad=True) for h in (6, 2, 2))
    doc = (torch.arange(12) >= 5).long()
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()).view(1, 1, 12, 12) \
        if doc_masked else None
    got = speed.grouped_matmul_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_matmul_attention_used_in_bf16_only(monkeypatch) -> None:  # noqa: ANN001
    """``use_matmul_attention``: under bf16 autocast the model's attention is the products (no SDPA
    call) and its loss is close to the SDPA model's; in fp32 and with a KV cache it is SDPA."""
    from llamalab.config import ModelConfig

    config = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=128, multiple_of=32,
                         max_seq_len=64)
    torch.manual_seed(0)
    plain = Transformer(config)
    plain.init_weights()
    fast = Transformer(config)
    fast.load_state_dict(plain.state_dict())
    assert speed.use_matmul_attention(fast) == config.n_layers
    assert list(fast.state_dict()) == list(plain.state_dict())
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    tokens = torch.randint(0, config.vocab_size, (3, 25), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fast = _loss(fast, tokens)
        assert calls == []
        loss_plain = _loss(plain, tokens)
        assert len(calls) == config.n_layers
    torch.testing.assert_close(loss_fast, loss_plain, rtol=2e-2, atol=0)
    _loss(fast, tokens)  # fp32: SDPA
    assert len(calls) == 2 * config.n_layers


def test_onednn_linear_auto_follows_the_cpus_avx512() -> None:
    """"auto" routes fp32 GEMMs through oneDNN only where /proc/cpuinfo lists avx512f (oneDNN ~2x
    MKL there, ~0.5x on the AVX2 EPYC); explicit settings win; never on another device."""
    from pathlib import Path

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags line")
    assert speed.resolve_onednn_linear("auto") == ("avx512f" in flags.split())
    assert speed.resolve_onednn_linear(True) is True and speed.resolve_onednn_linear(False) is False
    assert speed.resolve_onednn_linear(True, "meta") is False
    with pytest.raises(ValueError, match="expected true, false or 'auto'"):
        speed.resolve_onednn_linear("sometimes")
