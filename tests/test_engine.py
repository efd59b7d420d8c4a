"""The generation engine against independent references.

- greedy and beam search: transformers' ``LlamaForCausalLM.generate`` on tiny random models;
- logits processors: transformers' ``LogitsProcessor`` classes and a direct computation of the
  kept set and the renormalised probabilities;
- sampled log-probs: a full forward pass without the KV cache;
- batching: the same prompts generated one at a time;
- stop strings and streaming: a "script" model whose next token is a fixed function of the
  current one, so the output text (with multi-byte characters) is known in advance.
"""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.generate import (
    GenerationConfig,
    Generator,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from llamalab.generate.sampling import seen_mask
from llamalab.model import Transformer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llamalab.tokenizer.hf import HFTokenizer  # noqa: E402  (needs `tokenizers`)

EOT, EOS = "<|eot_id|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    """A byte-level BPE (every byte is a token, so multi-byte characters span several ids) with
    Llama 3's two stop tokens."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=262, special_tokens=[EOS, EOT],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["plain ascii words only"], trainer)
    return HFTokenizer(bpe, eos_id=bpe.token_to_id(EOS))


def _random_pair(vocab_size: int, seed: int = 0) -> tuple[Transformer, "transformers.LlamaForCausalLM"]:
    """Our model and transformers' with the same random weights. The head is scaled up so the
    next-token distributions are peaked: near-uniform logits would make argmax and beam ranking
    hinge on last-bit differences between two implementations."""
    from llamalab.checkpoint.convert import config_to_hf, hf_state_dict_to_meta

    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                      max_seq_len=96)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(30.0)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(hf_state_dict_to_meta(hf.state_dict(), cfg))
    return ours, hf


def _script_model(tok: HFTokenizer, cycle: list[int], pad_vocab: int = 16) -> Transformer:
    """A one-layer model that maps token ``cycle[i]`` to ``cycle[i + 1]`` (and the last back to the
    first): attention and feed-forward outputs are zero, the embedding is one-hot and the head
    reads the successor off it. Its vocabulary is padded past the tokenizer's."""
    n = tok.vocab_size
    dim = -(-n // 4) * 4
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=2, vocab_size=dim + pad_vocab, hidden_dim=8, max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_embeddings.weight[torch.arange(n), torch.arange(n)] = 1.0
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            model.output.weight[b, a] = 20.0 / math.sqrt(dim)  # normed one-hot is sqrt(dim) * e_a
    return model


# ------------------------------------------------------------------ greedy and beam search


def test_greedy_matches_transformers_with_two_stop_ids(tok: HFTokenizer) -> None:
    """Greedy ids equal transformers' greedy generate, including where one of two stop ids ends
    the output; the padded vocabulary rows are never chosen (transformers: suppress_tokens)."""
    ours, hf = _random_pair(vocab_size=tok.vocab_size + 30)
    gen = Generator(ours, tok)
    assert gen.vocab_limit == tok.vocab_size
    padded = list(range(tok.vocab_size, tok.vocab_size + 30))
    prompts = [[5, 17, 42, 8], [99], [3, 1, 4, 1, 5, 9, 2, 6]]
    free = gen.generate(prompts, GenerationConfig(max_new_tokens=20, stop_ids=()))
    stop_ids = (free[0].ids[6], free[2].ids[3])
    results = gen.generate(prompts, GenerationConfig(max_new_tokens=20, stop_ids=stop_ids))
    for prompt, got in zip(prompts, results):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                               eos_token_id=list(stop_ids), pad_token_id=0,
                               suppress_tokens=padded)[0, len(prompt):].tolist()
        assert got.ids == want
        assert max(got.ids) < tok.vocab_size
        assert got.finish_reason == ("stop" if got.ids[-1] in stop_ids else "length")
    assert results[0].finish_reason == results[2].finish_reason == "stop"


@pytest.mark.slow  # torch.compile of the one-token step: ~35 s on 2 cores with a cold Inductor cache (CI), ~6 s warm
def test_compiled_generator_warms_up_then_matches_transformers(tok: HFTokenizer) -> None:
    """``compile=True``: ``warm_up`` compiles the one-token step before any request, and the
    compiled generator's greedy ids then equal transformers' greedy generate."""
    ours, hf = _random_pair(vocab_size=tok.vocab_size)
    gen = Generator(ours, tok, compile=True)
    assert not gen.model._compiled_for
    assert gen.warm_up() > 0
    assert gen.model._compiled_for  # compiled (and used) by the warm-up
    prompt = [5, 17, 42, 8, 3]
    got = gen.generate([prompt], GenerationConfig(max_new_tokens=16, stop_ids=()))[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got.ids == want


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (2, 1.0, True), (3, 0.5, True), (4, 2.0, True), (3, -1.0, True), (3, 1.0, False), (2, 0.0, False),
])
def test_beam_search_matches_transformers(tok: HFTokenizer, num_beams: int, length_penalty: float,
                                          early_stopping: bool) -> None:
    ours, hf = _random_pair(vocab_size=tok.vocab_size, seed=1)
    gen = Generator(ours, tok)
    prompts = [[5, 17, 42, 8], [77, 3], [3, 1, 4, 1, 5, 9, 2, 6]]
    free = gen.generate(prompts, GenerationConfig(max_new_tokens=16, stop_ids=()))
    stop_ids = (free[0].ids[4], free[1].ids[7])
    config = GenerationConfig(max_new_tokens=16, num_beams=num_beams, length_penalty=length_penalty,
                              early_stopping=early_stopping, stop_ids=stop_ids)
    results = gen.generate(prompts, config)
    for prompt, got in zip(prompts, results):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, num_beams=num_beams, do_sample=False,
                               length_penalty=length_penalty, early_stopping=early_stopping,
                               eos_token_id=list(stop_ids), pad_token_id=0)[0, len(prompt):].tolist()
        assert got.ids == want, (prompt, got.ids, want)
        assert got.finish_reason == ("stop" if got.ids[-1] in stop_ids else "length")
    # Streaming a beam search gives its text in one piece.
    assert "".join(gen.stream(prompts[0], config)) == results[0].text == gen.last_result.text


def test_beam_search_with_repetition_penalty_matches_transformers(tok: HFTokenizer) -> None:
    ours, hf = _random_pair(vocab_size=tok.vocab_size, seed=2)
    prompt = [5, 17, 42, 8, 5, 5]
    got = Generator(ours, tok).generate([prompt], GenerationConfig(max_new_tokens=12, num_beams=3,
                                                                   repetition_penalty=1.5, stop_ids=()))[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=3, do_sample=False,
                           repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got.ids == want


# ------------------------------------------------------------------ batching


def test_batched_prompts_of_different_lengths_equal_one_by_one(tok: HFTokenizer) -> None:
    ours, _ = _random_pair(vocab_size=tok.vocab_size, seed=3)
    gen = Generator(ours, tok)
    prompts = [[3, 1, 4], [9, 2, 6, 5, 3, 5, 8, 9, 7], [100], [8, 8, 8, 8, 8]]
    alone = gen.generate([prompts[1]], GenerationConfig(max_new_tokens=12, stop_ids=()))[0]
    for penalty in (1.0, 1.3):
        config = GenerationConfig(max_new_tokens=12, repetition_penalty=penalty, stop_ids=(alone.ids[5],),
                                  logprobs=True)
        batched = gen.generate(prompts, config)
        singles = [gen.generate([p], config)[0] for p in prompts]
        for b, s in zip(batched, singles):
            assert b.ids == s.ids and b.finish_reason == s.finish_reason
            torch.testing.assert_close(b.logprobs, s.logprobs, atol=1e-4, rtol=0)
        assert {b.finish_reason for b in batched} == {"stop", "length"}  # rows really end at different steps
    # Sampling in a batch runs too (the per-row draws differ from one-by-one runs, by design).
    sampled = gen.generate(prompts, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=0, stop_ids=()))
    assert [len(r.ids) for r in sampled] == [8] * 4


# ------------------------------------------------------------------ processors


def _hf_processors():
    from transformers.generation import logits_process as lp

    return lp


@pytest.fixture()
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 50) * 3


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_matches_transformers_and_direct(logits: torch.Tensor, k: int) -> None:
    got = apply_top_k(logits, k)
    assert torch.equal(got, _hf_processors().TopKLogitsWarper(k)(None, logits.clone()))
    for row, out in zip(logits, got):
        kept = set(torch.isfinite(out).nonzero().flatten().tolist())
        assert kept == set(row.topk(k).indices.tolist())
        torch.testing.assert_close(out.softmax(-1)[list(kept)], row[list(kept)].softmax(-1))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.7, 0.95])
def test_top_p_matches_transformers_and_direct(logits: torch.Tensor, p: float) -> None:
    got = apply_top_p(logits, p)
    assert torch.equal(got, _hf_processors().TopPLogitsWarper(p)(None, logits.clone()))
    for row, out in zip(logits, got):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        n = next(i + 1 for i in range(len(order)) if probs[order[: i + 1]].sum() >= p)  # smallest such set
        assert set(torch.isfinite(out).nonzero().flatten().tolist()) == set(order[:n])
        renorm = torch.zeros_like(probs)
        renorm[order[:n]] = probs[order[:n]] / probs[order[:n]].sum()
        torch.testing.assert_close(out.softmax(-1), renorm)


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_matches_transformers_and_direct(logits: torch.Tensor, min_p: float) -> None:
    got = apply_min_p(logits, min_p)
    assert torch.equal(got, _hf_processors().MinPLogitsWarper(min_p)(None, logits.clone()))
    for row, out in zip(logits, got):
        probs = row.softmax(-1)
        kept = (probs >= min_p * probs.max()).nonzero().flatten().tolist()
        assert set(torch.isfinite(out).nonzero().flatten().tolist()) == set(kept)
        torch.testing.assert_close(out.softmax(-1)[kept], probs[kept] / probs[kept].sum())


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature_matches_transformers(logits: torch.Tensor, temperature: float) -> None:
    got = apply_temperature(logits, temperature)
    torch.testing.assert_close(got, _hf_processors().TemperatureLogitsWarper(temperature)(None, logits.clone()))
    torch.testing.assert_close(got.softmax(-1), (logits / temperature).softmax(-1))


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(logits: torch.Tensor, penalty: float) -> None:
    torch.manual_seed(1)
    history = torch.randint(0, 50, (4, 12))  # with repeats: a token is penalised once however often seen
    got = apply_repetition_penalty(logits, seen_mask(history.tolist(), 50), penalty)
    want = _hf_processors().RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(got, want)
    for row_in, row_out, ids in zip(logits, got, history.tolist()):
        for t in range(50):
            x = row_in[t].item()
            expect = (x * penalty if x < 0 else x / penalty) if t in ids else x
            assert row_out[t].item() == pytest.approx(expect)


def test_processors_compose_in_transformers_order(logits: torch.Tensor) -> None:
    lp = _hf_processors()
    history = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    hf = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7),
                                 lp.TopKLogitsWarper(12), lp.TopPLogitsWarper(0.8), lp.MinPLogitsWarper(0.1)])
    got = process_logits(logits, temperature=0.7, top_k=12, top_p=0.8, min_p=0.1, repetition_penalty=1.2,
                         seen=seen_mask(history.tolist(), 50))
    want = hf(history, logits.clone())
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


# ------------------------------------------------------------------ sampling


def test_seeded_sampling_is_reproducible_and_seeds_differ(tok: HFTokenizer) -> None:
    ours, _ = _random_pair(vocab_size=tok.vocab_size, seed=4)
    gen = Generator(ours, tok)
    prompt = [[5, 17, 42]]

    def run(seed: int) -> list[int]:
        config = GenerationConfig(max_new_tokens=24, temperature=1.5, top_p=0.95, seed=seed, stop_ids=())
        return gen.generate(prompt, config)[0].ids

    torch.manual_seed(123)  # the global RNG must not matter
    first = run(7)
    torch.manual_seed(456)
    assert run(7) == first
    assert run(8) != first
    # top_k=1 sampling is greedy decoding.
    greedy = gen.generate(prompt, GenerationConfig(max_new_tokens=24, stop_ids=()))[0].ids
    assert gen.generate(prompt, GenerationConfig(max_new_tokens=24, temperature=1.0, top_k=1, seed=0,
                                                 stop_ids=()))[0].ids == greedy
    assert first != greedy  # temperature 1.5 really samples


def test_sampled_logprobs_are_the_raw_log_softmax_at_the_chosen_ids(tok: HFTokenizer) -> None:
    """Log-probs are those of the raw model (a full forward pass, no cache), not of the processed
    distribution; each sampled id lies in the top-k of the penalised logits."""
    ours, _ = _random_pair(vocab_size=tok.vocab_size + 20, seed=5)
    gen = Generator(ours, tok)
    prompt = [5, 17, 42, 8, 17]
    config = GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=10, repetition_penalty=1.3, seed=3,
                              stop_ids=(), logprobs=True)
    result = gen.generate([prompt], config)[0]
    n = tok.vocab_size
    with torch.no_grad():
        full = ours(torch.tensor([prompt + result.ids]))[0, len(prompt) - 1: -1, :n]
    want = torch.log_softmax(full, -1).gather(-1, torch.tensor(result.ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(result.logprobs), want, atol=1e-4, rtol=0)
    history = list(prompt)
    for step, chosen in enumerate(result.ids):
        row = full[step].clone()
        seen = torch.tensor(sorted(set(history)))
        row[seen] = torch.where(row[seen] < 0, row[seen] * 1.3, row[seen] / 1.3)
        assert chosen in row.topk(10).indices.tolist()
        history.append(chosen)


# ------------------------------------------------------------------ stop tokens, stop strings, streaming

TEXT = "aï🦙€b"  # every byte a distinct token in this byte-level vocabulary


@pytest.mark.parametrize("stop_text", [EOT, EOS])
def test_either_llama3_stop_token_ends_generation(tok: HFTokenizer, stop_text: str) -> None:
    stop = tok.special_tokens[stop_text]
    cycle = tok.encode(TEXT) + [stop]
    gen = Generator(_script_model(tok, cycle), tok)
    result = gen.generate([cycle[:1]], GenerationConfig(max_new_tokens=30))[0]
    assert result.ids == cycle[1:] and result.finish_reason == "stop"
    assert result.text == TEXT[1:]
    # With the stop ids overridden the model runs on to the length limit.
    result = gen.generate([cycle[:1]], GenerationConfig(max_new_tokens=30, stop_ids=()))[0]
    assert len(result.ids) == 30 and result.finish_reason == "length"


def test_stop_string_cuts_text_and_stream_never_shows_it(tok: HFTokenizer) -> None:
    cycle = tok.encode(TEXT)
    gen = Generator(_script_model(tok, cycle), tok)
    config = GenerationConfig(max_new_tokens=30, stop_strings=("xyz", "🦙€"))
    result = gen.generate([cycle[:1]], config)[0]
    assert result.finish_reason == "stop" and result.text == "ï"
    assert tok.decode(result.ids) == "ï🦙€"  # ids run up to the token that completed the stop string
    pieces = list(gen.stream(cycle[:1], config))
    assert "".join(pieces) == "ï" == gen.last_result.text
    assert gen.last_result.ids == result.ids


def test_stream_holds_back_a_possible_stop_string_until_it_fails(tok: HFTokenizer) -> None:
    cycle = tok.encode(TEXT)
    gen = Generator(_script_model(tok, cycle), tok)
    config = GenerationConfig(max_new_tokens=22, stop_strings=("€bX",))  # "€b" appears, "€bX" never
    shown = ""
    pieces = list(gen.stream(cycle[:1], config))
    for piece in pieces[:-1]:
        shown += piece
        assert not shown.endswith(("€", "€b")), shown  # a possible stop string is never shown early
    assert "".join(pieces) == gen.last_result.text == tok.decode(gen.last_result.ids)
    assert gen.last_result.finish_reason == "length" and "€ba" in gen.last_result.text


def test_stream_reassembles_multibyte_text_without_splitting_characters(tok: HFTokenizer) -> None:
    cycle = tok.encode(TEXT)
    assert len(cycle) == len(TEXT.encode())  # the emoji is four tokens
    gen = Generator(_script_model(tok, cycle), tok)
    pieces = list(gen.stream(cycle[:1], GenerationConfig(max_new_tokens=21)))  # ends on a whole character
    assert all(p and "\ufffd" not in p for p in pieces)
    assert "".join(pieces) == gen.last_result.text == tok.decode(gen.last_result.ids) == "ï🦙€baï🦙€b"
    assert len(pieces) == 9  # one piece per completed character, none for the bytes in between


# ------------------------------------------------------------------ input errors


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", 1.2), ("repetition_penalty", 0.0), ("num_beams", 0), ("seed", -1),
    ("stop_ids", (-3,)), ("stop_strings", ("",)), ("length_penalty", float("inf")),
])
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}="):
        GenerationConfig(**{field: value}).validate()


def test_input_errors_are_clear(tok: HFTokenizer) -> None:
    model = _script_model(tok, tok.encode(TEXT))
    gen = Generator(model, tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], GenerationConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        gen.generate([[1] * 10], GenerationConfig(max_new_tokens=55))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        gen.generate([[model.config.vocab_size]], GenerationConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="beam search; set temperature=0"):
        gen.generate([[1]], GenerationConfig(max_new_tokens=8, num_beams=2, temperature=0.7))
    with pytest.raises(ValueError, match="is empty"):
        gen.stream([], GenerationConfig(max_new_tokens=8))  # raised at the call, before iteration
    with pytest.raises(ValueError, match="vocab_limit"):
        Generator(model, tok, vocab_limit=model.config.vocab_size + 1)


def test_sampling_draws_follow_the_distribution() -> None:
    """choose_next's draws: frequencies within 5 standard errors of the softmax's probabilities over
    200,000 draws, never a token cut to probability 0, and each draw the first id whose cumulative
    probability exceeds the row's uniform number (the inverse distribution function, by hand)."""
    from llamalab.generate.sampling import choose_next

    logits = torch.tensor([1.0, 0.0, -1.0, float("-inf"), 2.0, -0.5])
    probs = logits.double().softmax(-1)
    n = 200_000
    ids = choose_next(logits.expand(n, -1).clone(), 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=len(logits)).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert freq[3] == 0
    assert torch.all((freq - probs).abs() <= 5 * se + 1e-12), (freq, probs)
    # By hand for a few rows: the same generator gives the same uniforms.
    rows = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    got = choose_next(rows, 1.0, torch.Generator().manual_seed(2))
    u = torch.rand(4, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for r in range(4):
        p = rows[r].softmax(-1).double().tolist()
        acc, want = 0.0, None
        for i, x in enumerate(p):
            acc += x
            if acc > u[r, 0].item() * sum(p):
                want = i
                break
        assert got[r].item() == want


def test_repeated_prompts_share_one_prefill(tok: HFTokenizer) -> None:
    """K rows of one prompt (rejection sampling's batches) are prefilled once and the cache rows
    copied: greedy rows equal the prompt alone, and every sampled row's recorded log-probs equal
    a full forward pass (no cache) over the prompt and that row's tokens."""
    ours, _ = _random_pair(vocab_size=tok.vocab_size, seed=4)
    gen = Generator(ours, tok)
    p, q = [9, 2, 6, 5, 3, 5, 8], [4, 4]
    config = GenerationConfig(max_new_tokens=10, stop_ids=(), logprobs=True)
    batched = gen.generate([p, q, p, p], config)
    for b, prompt in zip(batched, [p, q, p, p]):
        s = gen.generate([prompt], config)[0]
        assert b.ids == s.ids
        torch.testing.assert_close(b.logprobs, s.logprobs, atol=1e-4, rtol=0)
    sampled = gen.generate([p] * 4, GenerationConfig(max_new_tokens=10, temperature=1.5, seed=0, stop_ids=(),
                                                     logprobs=True))
    assert len({tuple(r.ids) for r in sampled}) > 1  # the rows really are separate draws
    for r in sampled:
        with torch.no_grad():
            logits = ours(torch.tensor([p + r.ids]))[0, len(p) - 1:-1].float()
        want = torch.log_softmax(logits[:, :gen.n_vocab], -1).gather(-1, torch.tensor(r.ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)


def test_argmax_rows_is_torchs_argmax_ties_and_nan_included() -> None:
    """argmax_rows (numpy's argmax for fp32 CPU rows) picks what torch.argmax picks: the first of
    equal largest values, the first NaN; strided rows and other dtypes too."""
    from llamalab.generate.sampling import argmax_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 50, generator=g)
    x[1, 0, [7, 30]] = 9.0  # a tie: the first
    x[2, 0, [4, 20]] = float("nan")  # NaN: the first
    x[3, 0, :] = -float("inf")
    for t in (x[:, -1, :], x[:, -1, :40], x[:, -1, :].bfloat16(), x[:, -1, :].double()):
        got = argmax_rows(t)
        assert got.dtype == torch.int64 and got.tolist() == t.argmax(-1).tolist()
    assert argmax_rows(x[:, -1, :]).tolist()[1:3] == [7, 4]
