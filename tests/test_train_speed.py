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
def test_matmul_attention_matches_sdpa(doc_masked: bool) -> None:
    """``use_matmul_attention``: loss and every gradient equal the SDPA model's (GQA, 3 query heads
    per key/value head), causal and under the Llama 3 document mask; generation with a KV cache
    keeps SDPA."""
    from llamalab.config import ModelConfig

    config = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=128, multiple_of=32,
                         max_seq_len=64)
    torch.manual_seed(0)
    plain = Transformer(config)
    plain.init_weights()
    fast = Transformer(config)
    fast.load_state_dict(plain.state_dict())
    assert speed.use_matmul_attention(fast) == config.n_layers
    tokens = torch.randint(0, config.vocab_size, (3, 25), generator=torch.Generator().manual_seed(1))
    doc_ids = (torch.arange(24) >= 10).long().expand(3, 24) if doc_masked else None
    losses = []
    for model in (plain, fast):
        logits = model(tokens[:, :-1], doc_ids=doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        for model in (plain, fast):
            model.setup_cache(max_batch_size=1, max_seq_len=16)
        prompt = tokens[:1, :8]
        want = plain(prompt, input_pos=torch.arange(8))
        got = fast(prompt, input_pos=torch.arange(8))
    torch.testing.assert_close(got, want)
