"""A KV cache in another precision than the model (``Transformer.kv_cache_dtype``).

Reference: the model's full forward pass without a cache, with every layer's rotated keys and its
values rounded to the cache's dtype before attention (``Attention.attend`` wrapped), which is what a
cache that stores them in that dtype and reads them back widened computes. Decoding through the
cache (prefill, then one token a step) must give that reference's logits at every position, on the
plain model, the fast decode model (its fused attention kernel reads the 16-bit cache) and the
continuous batcher; and the reference must differ from the fp32 model's by far more than the
tolerance, so that the test can tell a rounded cache from an unrounded one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from llamalab.config import ModelConfig  # noqa: E402
from llamalab.generate.fast import optimize_for_decode  # noqa: E402
from llamalab.generate.gemv import gemv_available  # noqa: E402
from llamalab.model import Attention, Transformer  # noqa: E402
from test_batching import tok  # noqa: E402,F401 - the byte-level BPE fixture

TOL = dict(atol=2e-5, rtol=0)  # fp32 summation order (cached pass against the full one; logits ~8)
# head_dim 64 (the kernel's AVX-512 path) and 16, grouped-query and not
CONFIGS = {
    "gqa64": ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                         max_seq_len=64),
    "mha16": ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=96, multiple_of=32, max_seq_len=64),
}


def _tiny(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name])
    model.init_weights(std=0.08)
    return model.eval()


def _reference(model: Transformer, ids: list[int], dtype: torch.dtype | None,
               monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Full-forward logits (S, V) with keys and values rounded to ``dtype`` (None: as they are)."""
    if dtype is not None:
        attend = Attention.attend
        monkeypatch.setattr(Attention, "attend", lambda self, q, k, v, mask: attend(
            self, q, k.to(dtype).to(q.dtype), v.to(dtype).to(q.dtype), mask))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0]
    finally:
        monkeypatch.undo()


def _through_the_cache(model: Any, ids: list[int], prompt: int) -> tuple[torch.Tensor, torch.dtype]:
    """Logits (S - prompt + 1, V) at positions prompt-1 .. S-1: the prompt prefilled, then the rest of
    ``ids`` fed one token a step; and the cache's dtype."""
    model.setup_cache(max_batch_size=1, max_seq_len=len(ids))
    try:
        with torch.inference_mode():
            out = [model(torch.tensor([ids[:prompt]]), input_pos=torch.arange(prompt))[0, -1]]
            for pos in range(prompt, len(ids)):
                out.append(model(torch.tensor([[ids[pos]]]), input_pos=torch.tensor([pos]))[0, -1])
            base = model.model if hasattr(model, "model") else model
            dtype = base.layers[0].attention.kv_cache.k.dtype
    finally:
        model.clear_cache()
    return torch.stack(out), dtype


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cache", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
def test_a_16bit_cache_decodes_the_rounded_model(name: str, cache: torch.dtype, fast: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if fast and not gemv_available(torch.float32):
        pytest.skip("the decode kernel cannot be built here")
    model = _tiny(name)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    prompt = 9
    want = _reference(model, ids, cache, monkeypatch)[prompt - 1:]
    fp32 = _reference(model, ids, None, monkeypatch)[prompt - 1:]
    model.kv_cache_dtype = cache
    runner = optimize_for_decode(model) if fast else model
    got, stored = _through_the_cache(runner, ids, prompt)
    assert stored == cache
    # Not to fp32's 2e-5: the two passes compute each key in fp32 in other orders, and a key ~1e-7
    # from a rounding boundary of the cache's dtype then rounds the other way (one unit in its last
    # place). So the bound is relative to how far rounding the whole cache moves the logits (here
    # 1.5e-3 - 3e-2 at most): on average within a quarter of it (measured: 0.1-8%), where a cache
    # that kept fp32 would be off by all of it, and one in the other 16-bit dtype by 3-10 times it.
    moved = (want - fp32).abs()
    assert moved.max() > 20 * TOL["atol"]
    err = (got - want).abs()
    assert err.mean() < 0.25 * moved.mean(), (err.mean(), moved.mean())
    # And set back to fp32, the same steps give the fp32 model's logits.
    model.kv_cache_dtype = torch.float32
    got32, stored = _through_the_cache(runner, ids, prompt)
    assert stored == torch.float32
    torch.testing.assert_close(got32, fp32, **TOL)


def test_the_batcher_keeps_the_models_cache_dtype(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The continuous batcher's cache rows are in the model's ``kv_cache_dtype``, and a request
    decoded among others gets the rounded model's greedy tokens (the reference, argmax by argmax)."""
    from llamalab.generate import GenerationConfig, Generator
    from llamalab.generate.batching import ContinuousBatcher

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size + 4,
                                    multiple_of=32, max_seq_len=64))
    model.init_weights(std=0.08)
    model.eval()
    with torch.no_grad():
        model.output.weight.mul_(20.0)  # a peaked head: no near-ties for the argmax to hinge on
    model.kv_cache_dtype = torch.float16
    gen = Generator(model, tok)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 8)]
    cfg = GenerationConfig(max_new_tokens=10, stop_ids=())
    batcher = ContinuousBatcher(gen, max_batch=3, max_seq_len=32)
    requests = [batcher.submit(p, cfg) for p in prompts]
    batcher.run_until_done()
    assert batcher._cache()[0].k.dtype == torch.float16
    for p, r in zip(prompts, requests):
        ids = p + r.result.ids
        logits = _reference(model, ids[:-1], torch.float16, monkeypatch)
        assert logits[len(p) - 1:].argmax(-1).tolist() == r.result.ids


def test_a_quantized_gguf_keeps_an_f16_cache(tmp_path: Path) -> None:
    """As llama.cpp does for such files; a float load keeps the weights' dtype."""
    from test_checkpoint import make_hf_model, train_tokenizer, write_gguf

    import llamalab

    hf = make_hf_model("llama2-gqa", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2)
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", hf, "Q8_0", train_tokenizer())
    quantized = llamalab.load(path, dtype=None).model
    assert quantized.kv_cache_dtype == torch.float16
    quantized.setup_cache(max_batch_size=2, max_seq_len=8)
    assert quantized.layers[0].attention.kv_cache.k.dtype == torch.float16
    floats = llamalab.load(path, dtype=torch.float32).model
    floats.setup_cache(max_batch_size=1, max_seq_len=8)
    assert floats.kv_cache_dtype is None and floats.layers[0].attention.kv_cache.k.dtype == torch.float32


def test_kv_cache_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """``--kv-cache``: a bad value is a one-line error naming the choices; ``--verbose`` says which."""
    from llamalab.precision import parse_kv_cache

    assert parse_kv_cache("auto") is None
    assert parse_kv_cache("float16") == torch.float16 and parse_kv_cache("fp32") == torch.float32
    with pytest.raises(ValueError, match="--kv-cache 'int4': expected one of auto, float32, float16, bfloat16"):
        parse_kv_cache("int4")
    from llamalab.cli import _set_kv_cache

    model = _tiny("mha16")
    _set_kv_cache(model, "bfloat16", verbose=True)
    assert model.kv_cache_dtype == torch.bfloat16
    assert "llamalab: KV cache bfloat16" in capsys.readouterr().err
