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
from llamalab.eval.lm import EvalModel, rolling_windows  # noqa: E402
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
