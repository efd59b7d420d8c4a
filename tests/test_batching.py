"""Continuous batching (``llamalab.generate.batching``): requests that join and leave a running batch
get what each would get alone from ``Generator.generate`` (greedy: the same ids; every setting
kept per request), on the plain model, the fast decode model and a quantized GGUF model.

References: ``Generator.generate`` on one prompt at a time (itself tested against transformers'
``generate`` in test_engine.py), and the sampling formula for seeded draws.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from llamalab.config import ModelConfig  # noqa: E402
from llamalab.generate import GenerationConfig, Generator  # noqa: E402
from llamalab.generate.batching import ContinuousBatcher  # noqa: E402
from llamalab.model import Transformer  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
from llamalab.tokenizer.hf import HFTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return HFTokenizer(bpe, eos_id=bpe.token_to_id("<eos>"))


def _model(vocab: int, seed: int = 0) -> Transformer:
    """A tiny random model with a peaked head (near-uniform logits would make argmax hinge on
    last-bit differences between a batch of 1 and a batch of several)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=128)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(30.0)
    return model


def _prompts(tok: HFTokenizer, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tok.vocab_size, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("fast", [False, True])
def test_requests_joining_and_leaving_equal_each_alone(tok: HFTokenizer, fast: bool) -> None:
    """Seven greedy requests of different prompt and answer lengths, three of them arriving while
    the others run, through a batch of 4 rows: each equals ``Generator.generate`` of it alone."""
    gen = Generator(_model(tok.vocab_size + 4), tok, fast=fast)
    prompts = _prompts(tok, 7)
    configs = [GenerationConfig(max_new_tokens=n, stop_ids=()) for n in (12, 3, 20, 7, 1, 15, 9)]
    alone = [gen.generate([p], c)[0] for p, c in zip(prompts, configs)]
    batcher = ContinuousBatcher(gen, max_batch=4, max_seq_len=64)
    requests = [batcher.submit(p, c) for p, c in zip(prompts[:4], configs[:4])]
    sizes = []
    for step in range(200):
        if step in (2, 5, 6):  # newcomers at token boundaries, into whatever rows are free
            i = len(requests)
            requests.append(batcher.submit(prompts[i], configs[i]))
        if not batcher.has_work() and len(requests) == len(prompts):
            break
        sizes.append(batcher.step())
    assert all(r.result is not None for r in requests)
    for r, want in zip(requests, alone):
        assert r.result.ids == want.ids and r.result.text == want.text and r.result.finish_reason == want.finish_reason
    assert max(sizes) == 4  # the batch filled up
    assert batcher.running == 0 and batcher.waiting == 0


def test_settings_stay_per_request(tok: HFTokenizer) -> None:
    """Side by side in one batch: a stop string, a stop id, a repetition penalty, log-probs and a
    seeded sampled request each give exactly their alone results (the seeded draws too: every
    request samples from its own torch.Generator)."""
    gen = Generator(_model(tok.vocab_size + 4, seed=1), tok, fast=False)
    prompts = _prompts(tok, 5, seed=3)
    greedy = gen.generate([prompts[0]], GenerationConfig(max_new_tokens=16, stop_ids=()))[0]
    configs = [
        GenerationConfig(max_new_tokens=16, stop_ids=(), stop_strings=(greedy.text[3:5],)),
        GenerationConfig(max_new_tokens=16, stop_ids=(greedy.ids[6],)),
        GenerationConfig(max_new_tokens=16, stop_ids=(), repetition_penalty=1.3),
        GenerationConfig(max_new_tokens=16, stop_ids=(), logprobs=True),
        GenerationConfig(max_new_tokens=16, stop_ids=(), temperature=0.9, top_k=20, top_p=0.9, seed=1234),
    ]
    prompts[1] = prompts[0]
    alone = [gen.generate([p], c)[0] for p, c in zip(prompts, configs)]
    batcher = ContinuousBatcher(gen, max_batch=8, max_seq_len=64)
    requests = [batcher.submit(p, c) for p, c in zip(prompts, configs)]
    batcher.run_until_done()
    for r, want in zip(requests, alone):
        assert r.result.ids == want.ids and r.result.text == want.text and r.result.finish_reason == want.finish_reason
    assert requests[0].result.finish_reason == "stop" and requests[1].result.ids[-1] == greedy.ids[6]
    torch.testing.assert_close(torch.tensor(requests[3].result.logprobs), torch.tensor(alone[3].logprobs),
                               atol=1e-5, rtol=0)


def test_streaming_pieces_join_to_the_text_and_cancel_frees_the_row(tok: HFTokenizer) -> None:
    """``on_token`` pieces join to the final text; a request cancelled mid-way leaves the batch at
    the next step (its ``on_done`` runs once, without a result) and a waiting one takes its row."""
    gen = Generator(_model(tok.vocab_size + 4, seed=2), tok, fast=False)
    prompts = _prompts(tok, 3, seed=5)
    cfg = GenerationConfig(max_new_tokens=30, stop_ids=())
    pieces: list[str] = []
    done: list[Any] = []
    batcher = ContinuousBatcher(gen, max_batch=2, max_seq_len=64)
    streamed = batcher.submit(prompts[0], cfg, on_token=lambda r: pieces.append(r.seq.new_text()),
                              on_done=done.append)
    doomed = batcher.submit(prompts[1], cfg, on_done=done.append)
    third = batcher.submit(prompts[2], GenerationConfig(max_new_tokens=5, stop_ids=()), on_done=done.append)
    for _ in range(3):
        batcher.step()
    assert batcher.running == 2 and batcher.waiting == 1
    threading.Thread(target=doomed.cancel).start()  # from another thread, as a server's event loop does
    while not doomed.cancelled:
        pass
    batcher.step()
    assert doomed.result is None and done.count(doomed) == 1
    assert third in batcher.rows  # admitted into the freed row in the same step
    batcher.run_until_done()
    assert "".join(pieces) == streamed.result.text == gen.generate([prompts[0]], cfg)[0].text
    assert third.result.ids == gen.generate([prompts[2]], third.config)[0].ids
    assert done.count(streamed) == 1 and done.count(third) == 1


def test_bad_requests_are_refused_at_submit(tok: HFTokenizer) -> None:
    gen = Generator(_model(tok.vocab_size + 4), tok, fast=False)
    batcher = ContinuousBatcher(gen, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="slot length of 32"):
        batcher.submit([1] * 20, GenerationConfig(max_new_tokens=20))
    with pytest.raises(ValueError, match="beam search"):
        batcher.submit([1, 2], GenerationConfig(max_new_tokens=4, num_beams=2))
    with pytest.raises(ValueError, match="empty"):
        batcher.submit([], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_seq_len=500"):
        ContinuousBatcher(gen, max_seq_len=500)


def test_the_model_serves_plain_calls_between_steps(tok: HFTokenizer) -> None:
    """The batcher's cache is in the model only during a step: a plain ``generate`` between two
    steps neither sees nor disturbs it."""
    gen = Generator(_model(tok.vocab_size + 4, seed=4), tok, fast=True)
    prompts = _prompts(tok, 2, seed=7)
    cfg = GenerationConfig(max_new_tokens=10, stop_ids=())
    want = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher = ContinuousBatcher(gen, max_batch=2, max_seq_len=64)
    requests = [batcher.submit(p, cfg) for p in prompts]
    batcher.step()
    batcher.step()
    assert gen.generate([prompts[1]], cfg)[0].ids == want[1]
    batcher.run_until_done()
    assert [r.result.ids for r in requests] == want


def test_quantized_model_batches_too(tmp_path: Path) -> None:
    """A GGUF model on its Q8_0 blocks (the batched rows through the quantized kernels' multi-row
    paths): each request's greedy ids equal its alone run."""
    from test_checkpoint import make_hf_model, train_tokenizer, write_gguf

    import llamalab

    hf = make_hf_model("llama2-gqa", seed=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.05)
    with torch.no_grad():
        hf.lm_head.weight.mul_(30.0)
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", hf, "Q8_0", train_tokenizer())
    lm = llamalab.load(path, dtype=None)
    gen = Generator(lm.model, lm.tokenizer)
    prompts = _prompts(lm.tokenizer, 6, seed=9)
    cfg = GenerationConfig(max_new_tokens=8, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher = ContinuousBatcher(gen, max_batch=6, max_seq_len=64)
    requests = [batcher.submit(p, cfg) for p in prompts]
    batcher.run_until_done()
    same = sum(r.result.ids == a for r, a in zip(requests, alone))
    assert same == len(prompts), [(r.result.ids, a) for r, a in zip(requests, alone)]


def test_short_prompts_are_not_padded_onto_the_prompt_tiles(tmp_path: Path) -> None:
    """Newcomers shorter than the quantized kernels' prompt-tile length (AMX's bf16 tiles, which round
    otherwise than the int8 products) are prefilled apart from longer ones, so that none is padded
    past it; every answer still equals its alone run. Where the CPU has no such tiles the length is
    set here, to check the grouping all the same."""
    gen, cut = _tiny_q8_0(tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, gen.tokenizer.vocab_size, (n,), generator=g).tolist()
               for n in (cut + 9, 3, cut - 1, cut, 7, cut + 2)]
    cfg = GenerationConfig(max_new_tokens=6, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher, calls = _recording_batcher(gen, cut, max_batch=6, max_seq_len=64, prefix_cache_size=0)
    requests = [batcher.submit(p, cfg) for p in prompts]
    batcher.run_until_done()
    assert sorted(calls) == [[3, cut - 1, 7], [cut + 9, cut, cut + 2]], calls
    assert [r.result.ids for r in requests] == alone


def _tiny_q8_0(tmp_path: Path) -> tuple[Generator, int]:
    """A Generator on a tiny Q8_0 GGUF (its quantized kernels), and the prompt-tile length: the CPU's
    (AMX), else 16, which the tests set on the batcher to check its grouping all the same."""
    from test_checkpoint import make_hf_model, train_tokenizer, write_gguf

    import llamalab
    from llamalab.quant import kernels

    hf = make_hf_model("llama2-gqa", seed=7, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.05)
    with torch.no_grad():
        hf.lm_head.weight.mul_(30.0)
    lm = llamalab.load(write_gguf(tmp_path / "tiny-Q8_0.gguf", hf, "Q8_0", train_tokenizer()), dtype=None)
    return Generator(lm.model, lm.tokenizer), kernels.bf16_min_tokens() or 16


def _recording_batcher(gen: Generator, cut: int, **kw: Any) -> tuple[ContinuousBatcher, list[list[int]]]:
    """A batcher with prompt-tile length ``cut`` that records the lengths each prefill call runs."""
    batcher = ContinuousBatcher(gen, **kw)
    batcher._prompt_tiles_from = lambda: cut  # type: ignore[method-assign]
    calls: list[list[int]] = []
    prefill_rows = batcher._prefill_rows

    def recorded(row: int, rest: list[list[int]], starts: list[int]) -> torch.Tensor:
        calls.append([len(t) for t in rest])
        return prefill_rows(row, rest, starts)

    batcher._prefill_rows = recorded  # type: ignore[method-assign]
    return batcher, calls


def test_a_cached_prefix_leaves_the_prompt_tiles_their_length(tmp_path: Path) -> None:
    """With prompt tiles (AMX's bf16 products, from ``cut`` tokens), a prompt sharing a cached prefix
    still prefills at least ``cut`` tokens, on the tiles as alone: the prefix is reused only up to
    ``len(prompt) - cut`` (not at all where that is under ``min_prefix``), and prompts shorter than
    ``cut`` are not remembered; every answer equals its alone run."""
    gen, cut = _tiny_q8_0(tmp_path)
    g = torch.Generator().manual_seed(8)

    def rand(n: int) -> list[int]:
        return torch.randint(0, gen.tokenizer.vocab_size, (n,), generator=g).tolist()

    system = rand(30)
    prompts = [system + rand(n) for n in (6, 9)] + [system + rand(3), system[:24] + rand(5)]
    cfg = GenerationConfig(max_new_tokens=6, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher, calls = _recording_batcher(gen, cut, max_batch=4, max_seq_len=64)
    first = [batcher.submit(p, cfg) for p in prompts[:2]]
    batcher.run_until_done()
    assert list(batcher._prefixes) == [tuple(system)]
    later = [batcher.submit(p, cfg) for p in prompts[2:]]
    batcher.run_until_done()
    # 33 tokens: 30 shared, but 17 reused and 16 prefilled; 29 tokens: 24 shared, 13 < 16 reusable: none
    assert [r.reused for r in later] == [len(prompts[2]) - cut, 0]
    assert all(n >= cut for call in calls for n in call), calls
    assert [r.result.ids for r in first + later] == alone


def test_a_shared_prompt_prefix_is_prefilled_once(tok: HFTokenizer) -> None:
    """Prompts that start alike (a chat template's system prompt): after two of them, the shared
    prefix's keys and values are cached, and later prompts prefill only their own rest; every
    answer still equals the prompt's alone run (in batches of newcomers with and without a hit)."""
    gen = Generator(_model(tok.vocab_size + 4, seed=6), tok, fast=True)
    g = torch.Generator().manual_seed(11)
    system = torch.randint(0, tok.vocab_size, (24,), generator=g).tolist()
    prompts = [system + torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 1)]
    cfg = GenerationConfig(max_new_tokens=10, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher = ContinuousBatcher(gen, max_batch=4, max_seq_len=64)
    first = [batcher.submit(p, cfg) for p in prompts[:2]]
    batcher.step()
    assert batcher.prefix_hits == 0 and len(batcher._prefixes) == 1  # the two shared 24 tokens
    rest = [batcher.submit(p, cfg) for p in prompts[2:]]
    batcher.run_until_done()
    assert batcher.prefix_hits == 4 and batcher.prefix_tokens_reused == 4 * 24
    assert [r.reused for r in rest] == [24] * 4
    assert [r.result.ids for r in first + rest] == alone


def test_the_prefill_budget_counts_the_tokens_left_to_prefill(tok: HFTokenizer) -> None:
    """max_prefill_tokens bounds the tokens a step prefills: prompts whose start is cached count
    only their rest (four 24 + 6-token prompts after the system prompt is cached fit a budget of
    12 two a step, not one), newcomers beyond it wait for the next step, and every answer still
    equals its alone run."""
    gen = Generator(_model(tok.vocab_size + 4, seed=8), tok, fast=True)
    g = torch.Generator().manual_seed(13)
    system = torch.randint(0, tok.vocab_size, (24,), generator=g).tolist()
    prompts = [system + torch.randint(0, tok.vocab_size, (6,), generator=g).tolist() for _ in range(6)]
    cfg = GenerationConfig(max_new_tokens=6, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    batcher = ContinuousBatcher(gen, max_batch=8, max_seq_len=64, max_prefill_tokens=12)
    warm = [batcher.submit(p, cfg) for p in prompts[:2]]  # 30 tokens each: one a step (a long one alone)
    batcher.step()
    assert batcher.running == 1 and batcher.waiting == 1
    batcher.step()
    assert batcher.running == 2 and len(batcher._prefixes) == 1  # the shared 24 tokens cached
    rest = [batcher.submit(p, cfg) for p in prompts[2:]]
    batcher.step()
    assert batcher.running == 4 and batcher.waiting == 2  # 6 + 6 tokens to prefill: two of them
    batcher.run_until_done()
    assert [r.reused for r in rest] == [24] * 4
    assert [r.result.ids for r in warm + rest] == alone


def test_a_cached_prefix_serves_prompts_sharing_only_its_start(tok: HFTokenizer) -> None:
    """Two prompts sharing a system prompt and two more words cache those 26 tokens; a third that
    shares only the 24-token system prompt reuses those 24 positions of the cached prefix (the keys
    and values of a position depend on the tokens before it alone) instead of missing, a cached
    prefix that a longer one extends is replaced by it, and every answer equals its alone run."""
    gen = Generator(_model(tok.vocab_size + 4, seed=7), tok, fast=True)
    g = torch.Generator().manual_seed(12)
    system = torch.randint(0, tok.vocab_size, (24,), generator=g).tolist()
    words = torch.randint(0, tok.vocab_size, (2,), generator=g).tolist()

    def rand(n: int) -> list[int]:
        return torch.randint(0, tok.vocab_size, (n,), generator=g).tolist()

    a, b = system + words + rand(6), system + words + rand(4)
    c = system + [(words[0] + 1) % tok.vocab_size] + rand(5)
    cfg = GenerationConfig(max_new_tokens=8, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in (a, b, c)]
    batcher = ContinuousBatcher(gen, max_batch=4, max_seq_len=64)
    first = [batcher.submit(p, cfg) for p in (a, b)]
    batcher.run_until_done()
    assert list(batcher._prefixes) == [tuple(system + words)]
    third = batcher.submit(c, cfg)
    batcher.run_until_done()
    assert third.reused == 24 and batcher.prefix_hits == 1
    assert [r.result.ids for r in [*first, third]] == alone
    # a prompt extending the cached prefix's start by more: its longer shared prefix replaces it
    more = rand(3)
    d, e = system + words + more + rand(3), system + words + more + rand(4)
    for p in (d, e):
        batcher.submit(p, cfg)
        batcher.run_until_done()
    assert list(batcher._prefixes) == [tuple(system + words + more)]


def test_logit_bias_is_added_before_choosing(tok: HFTokenizer) -> None:
    """OpenAI's logit_bias: +100 on one id makes greedy choose it every step; -100 on the unbiased
    greedy first token makes the first token the argmax of the other logits (computed here from the
    plain model's logits); the batcher and Generator.generate agree."""
    model = _model(tok.vocab_size + 4, seed=8)
    gen = Generator(model, tok, fast=False)
    prompt = _prompts(tok, 1, seed=13)[0]
    plain = gen.generate([prompt], GenerationConfig(max_new_tokens=6, stop_ids=()))[0]
    forced = GenerationConfig(max_new_tokens=6, stop_ids=(), logit_bias={7: 100.0})
    banned = GenerationConfig(max_new_tokens=6, stop_ids=(), logit_bias={plain.ids[0]: -100.0})
    assert gen.generate([prompt], forced)[0].ids == [7] * 6
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1, : gen.n_vocab]
    first[plain.ids[0]] = float("-inf")
    out = gen.generate([prompt], banned)[0]
    assert out.ids[0] == int(first.argmax()) != plain.ids[0]
    batcher = ContinuousBatcher(gen, max_batch=3, max_seq_len=64)
    rs = [batcher.submit(prompt, c) for c in (forced, banned, GenerationConfig(max_new_tokens=6, stop_ids=()))]
    batcher.run_until_done()
    assert [r.result.ids for r in rs] == [[7] * 6, out.ids, plain.ids]
    with pytest.raises(ValueError, match="logit_bias"):
        GenerationConfig(logit_bias={3: 101.0}).validate()


def test_the_worker_prefills_a_burst_together(tok: HFTokenizer) -> None:
    """Requests arriving at an idle worker a moment apart (1 ms, within a burst gap set wide here,
    200 ms, so that a loaded machine's sleeps cannot split the burst) are prefilled in one step, the
    first not alone; with the gap off the first starts at once, alone (the next come 300 ms later);
    either way each answer is its alone run."""
    import asyncio
    import time

    from llamalab.serve.worker import DONE, BatchingWorker, Job

    gen = Generator(_model(tok.vocab_size + 4, seed=8), tok, fast=True)
    prompts = _prompts(tok, 4, seed=13)
    cfg = GenerationConfig(max_new_tokens=4, stop_ids=())
    alone = [gen.generate([p], cfg)[0].ids for p in prompts]
    loop = asyncio.new_event_loop()
    try:
        for gap, first_batch in ((0.2, 4), (0.0, 1)):
            steps: list[int] = []
            worker = BatchingWorker(gen, max_batch=4, max_seq_len=64, burst_gap=gap,
                                    on_step=lambda b, s: steps.append(b))
            worker.start()
            time.sleep(0.05)  # idle, waiting for work
            jobs = []
            for p in prompts:
                jobs.append(Job([p], cfg, stream=False, loop=loop))
                worker.submit(jobs[-1])
                time.sleep(0.001 if gap else 0.3)
            deadline = time.time() + 30
            while worker.busy and time.time() < deadline:
                time.sleep(0.01)
            worker.stop()
            loop.run_until_complete(asyncio.sleep(0))  # deliver the events the worker queued
            results = [j.events.get_nowait() for j in jobs]
            assert all(kind == DONE for kind, _ in results)
            assert [payload[0].ids for _, payload in results] == alone
            assert steps[0] == first_batch, (gap, steps)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="burst_gap=-1 must be >= 0"):
        BatchingWorker(gen, burst_gap=-1)
