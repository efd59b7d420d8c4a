"""The generation engine: prefill once, then one token per step from the model's static KV cache.

``Generator.generate`` runs a batch of prompts of different lengths together (greedy or sampled)
or beam search; ``Generator.stream`` yields the text of one prompt as it is produced. The
``Transformer`` holds one KV cache, so a ``Generator`` runs one call at a time: callers that
share a model between threads (a server) must serialise calls.

Batching works with right padding: the prompts are prefilled together at positions
``0..L-1`` (L = the longest prompt); row i's first token comes from its logits at ``len_i - 1``;
then every row decodes at its own position (``input_pos`` of shape (B, 1)). A padding slot of
row i lies at a position after its real tokens, so the causal mask hides it, and row i writes its
own token there before its position reaches it. Each row therefore computes exactly what it
would alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from llamalab.generate.fast import DecodeModel, onednn_available, optimize_for_decode
from llamalab.generate.sampling import (
    apply_repetition_penalty,
    choose_next,
    process_logits,
    seen_mask,
)
from llamalab.model import KVCache, Transformer
from llamalab.tokenizer.base import Tokenizer

__all__ = ["GenerationConfig", "GenerationResult", "Generator", "TextStreamer", "greedy_generate"]


@dataclass
class GenerationConfig:
    """How to generate. The defaults are greedy decoding of up to 256 tokens.

    Sampling knobs mean what they mean in ``transformers.generate`` and are applied in its order
    (repetition penalty, temperature, top-k, top-p, min-p). ``temperature == 0`` is greedy: the
    filters are then ignored (they never change the argmax). ``num_beams > 1`` is deterministic
    beam search and needs ``temperature == 0``.

    ``logprobs``: record, for each generated token, its log-probability under the *raw* model
    distribution (log-softmax of the unprocessed logits over the choosable vocabulary), as the
    OpenAI API reports it -- not under the distribution after penalty, temperature and filters.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 => greedy (argmax); > 0 => sample
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, as transformers' RepetitionPenaltyLogitsProcessor
    num_beams: int = 1  # > 1 => beam search (deterministic)
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated_len ** length_penalty
    early_stopping: bool = True  # beam search ends once num_beams hypotheses have finished
    seed: int | None = None  # reproducible sampling: a torch.Generator seeded per call
    stop_ids: tuple[int, ...] | None = None  # None => the tokenizer's stop_ids
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False
    logit_bias: dict[int, float] | None = None  # added to those ids' logits before anything else (OpenAI's)
    json_object: bool = False  # JSON mode: the answer is a JSON object, token by token (generate/constrain.py)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"GenerationConfig.{name}={getattr(self, name)!r}: expected {allowed}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_number(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1] (1 = off)")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1] (0 = off)")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1 (1 = no beam search)")
        if not is_number(self.length_penalty):
            raise bad("length_penalty", "a finite number")
        if not isinstance(self.early_stopping, bool):
            raise bad("early_stopping", "True or False")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "None or an integer in [0, 2**63)")
        if self.stop_ids is not None and not all(is_int(i) and i >= 0 for i in self.stop_ids):
            raise bad("stop_ids", "None or a sequence of non-negative token ids")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise bad("stop_strings", "a sequence of non-empty strings")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "True or False")
        if self.logit_bias is not None and not (
                isinstance(self.logit_bias, dict)
                and all(is_int(k) and k >= 0 and is_number(v) and -100 <= v <= 100 for k, v in self.logit_bias.items())):
            raise bad("logit_bias", "None or a dict of token id -> bias in [-100, 100]")
        if not isinstance(self.json_object, bool):
            raise bad("json_object", "True or False")
        if self.json_object and self.num_beams > 1:
            raise bad("json_object", "False with beam search (num_beams > 1): JSON mode constrains sampling and greedy")
        if self.num_beams > 1 and self.temperature != 0:
            raise ValueError(f"GenerationConfig: num_beams={self.num_beams} is deterministic beam search; "
                             f"set temperature=0 (got {self.temperature}); beam sampling is not supported")


@dataclass
class GenerationResult:
    """One prompt's output and the time spent in each phase."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated ids, the stop token included if one ended it
    text: str = ""  # generated text without the stop token, cut before any stop string
    finish_reason: str = "length"  # "length" | "stop"
    logprobs: list[float] | None = None  # raw model log-prob of each id in `ids`
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens processed per second."""
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens generated per second after the first (which prefill produces)."""
        n = max(len(self.ids) - 1, 0)
        return n / self.decode_s if self.decode_s and n else float("nan")

    @property
    def stopped_by(self) -> str:
        """The old name of ``finish_reason``: "stop_token" or "length" (kept for the CLI's JSON)."""
        return "stop_token" if self.finish_reason == "stop" else "length"


class _Sequence:
    """One hypothesis being generated: its ids, log-probs, and whether (and why) it finished."""

    def __init__(self, prompt: list[int], decode: Callable[[list[int]], str], stop_ids: frozenset[int],
                 stop_strings: tuple[str, ...], max_new_tokens: int, logprobs: bool) -> None:
        self.prompt = prompt
        self.decode = decode
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        self.max_new_tokens = max_new_tokens
        self.ids: list[int] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        self.finish_reason: str | None = None
        self.stop_at: int | None = None  # where the first stop string starts in the text
        self.shown = 0  # characters of the text already streamed
        self._decoded: tuple[int, str] = (0, "")  # (number of ids, their text): decode once per step
        self.decode_s = 0.0
        self.constraint: Any = None  # a generate.constrain.JSONConstraint in JSON mode

    @property
    def finished(self) -> bool:
        """Whether a stop token, a stop string or the length limit ended this sequence."""
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None = None) -> None:
        """Append one generated id and decide whether the sequence is finished."""
        self.ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self.constraint is not None:
            self.constraint.commit(token)
            if self.constraint.done:  # the JSON object has closed: nothing may follow it
                self.finish_reason = "stop"
                return
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        if self.stop_strings:
            text = self._raw_text()
            hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
            if hits:
                self.stop_at = min(hits)
                self.finish_reason = "stop"
                return
        if len(self.ids) >= self.max_new_tokens:
            self.finish_reason = "length"

    def extended(self, token: int, logprob: float | None) -> _Sequence:
        """A copy with one more id (beam search branches a hypothesis into several)."""
        new = _Sequence(self.prompt, self.decode, self.stop_ids, self.stop_strings, self.max_new_tokens,
                        self.logprobs is not None)
        new.ids = list(self.ids)
        new.logprobs = None if self.logprobs is None else list(self.logprobs)
        new.add(token, logprob)
        return new

    def _raw_text(self) -> str:
        if self._decoded[0] != len(self.ids):
            ids = self.ids[:-1] if self.ids and self.ids[-1] in self.stop_ids else self.ids
            self._decoded = (len(self.ids), self.decode(ids))
        return self._decoded[1]

    def text(self) -> str:
        """The generated text: without the stop token, cut before the first stop string."""
        text = self._raw_text()
        return text if self.stop_at is None else text[: self.stop_at]

    def new_text(self) -> str:
        """The text that became safe to show since the last call (for streaming).

        While generating, two kinds of tail are held back: U+FFFD at the end (a multi-byte
        character whose bytes are still arriving), and a tail that could be the start of a stop
        string (it may yet be cut). Once finished, everything left is released.
        """
        text = self.text()
        end = len(text)
        if not self.finished:
            end = len(text.rstrip("\ufffd"))
            end -= _stop_prefix_len(text[:end], self.stop_strings)
        piece = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    def result(self, prefill_s: float) -> GenerationResult:
        """This sequence as a ``GenerationResult``."""
        return GenerationResult(prompt_ids=list(self.prompt), ids=list(self.ids), text=self.text(),
                                finish_reason=self.finish_reason or "length", logprobs=self.logprobs,
                                prefill_s=prefill_s, decode_s=self.decode_s)


def biased(logits: Tensor, logit_bias: dict[int, float] | None) -> Tensor:
    """``logits`` (..., V) with OpenAI's ``logit_bias`` added to its ids (a copy; ids past V ignored)."""
    if not logit_bias:
        return logits
    ids = [i for i in logit_bias if i < logits.shape[-1]]
    out = logits.clone()
    out[..., ids] += torch.tensor([float(logit_bias[i]) for i in ids], dtype=out.dtype, device=out.device)
    return out


def _stop_prefix_len(text: str, stop_strings: Iterable[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _worth_compacting(batch: int, live: int) -> bool:
    """Whether to shrink a decode batch of ``batch`` rows to its ``live`` running ones.

    A CPU decode step reads every weight once whatever the batch, so a few idle rows cost little;
    the cost steps down where the batch gets much smaller: at half the rows, at the matrix-vector
    kernel's 4 rows, and at 1 row (the plain path). Copying the cache rows costs one read of the
    live rows' cache, less than a step.
    """
    if live == batch or live == 0:
        return False
    return live <= batch // 2 or live == 1 or (batch > 4 >= live)


class Generator:
    """Generates text with a ``Transformer`` and its ``Tokenizer``."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, vocab_limit: int | None = None,
                 fast: bool = True, compile: bool = False) -> None:
        """``vocab_limit``: only ids below it are ever chosen. It defaults to the tokenizer's
        vocabulary size when that is smaller than the model's: embedding tables are often padded
        (to a multiple of 64 or 128) and the padded rows have no text.

        ``fast``: on a CPU, run the model through :func:`llamalab.generate.fast.optimize_for_decode`
        (llamalab's matrix-vector kernel for decode steps, oneDNN for prefill, fused steps:
        ~2.4x the plain model's decode speed at fp32 and bf16; fp32 logits equal to ~1e-6 relative).
        ``compile``: also ``torch.compile`` its batch-1 one-token step (another ~1.15x decode
        speed at fp32, ~1.2x at bf16, on CPU, after ~20-80 s of compiling at the first
        reply or at :meth:`warm_up`; see
        :func:`~llamalab.generate.fast.optimize_for_decode`). Worth it for a server or a long
        session, not for one short reply.
        """
        if fast and isinstance(model, Transformer) and onednn_available(model.tok_embeddings.weight.device):
            model = optimize_for_decode(model, compile=compile)
        self.model = model
        self.tokenizer = tokenizer
        n_model = model.config.vocab_size
        if vocab_limit is None and tokenizer.vocab_size < n_model:
            vocab_limit = tokenizer.vocab_size
        if vocab_limit is not None and not 1 <= vocab_limit <= n_model:
            raise ValueError(f"Generator: vocab_limit={vocab_limit} must be in [1, {n_model}] (the model's vocab_size)")
        self.vocab_limit = vocab_limit
        self.n_vocab = vocab_limit or n_model
        self.last_result: GenerationResult | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so its KV cache) live."""
        return self.model.tok_embeddings.weight.device

    # ---------------------------------------------------------------- public API

    def warm_up(self) -> float:
        """Run a short greedy generation now, so that a compiled step (``compile=True``) is
        compiled before the first real request rather than during it; returns the seconds taken."""
        t0 = time.perf_counter()
        prompt = self.tokenizer.encode("Hello, world", bos=self.tokenizer.bos_id is not None)
        # No stop ids: an early end of text would skip the one-token steps that get compiled.
        self.generate([prompt], GenerationConfig(max_new_tokens=4, stop_ids=()))
        return time.perf_counter() - t0

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Generate a continuation of each prompt; prompts may have different lengths.

        With ``num_beams == 1`` the prompts run together as one batch; each result equals
        generating that prompt alone (greedy: the same ids). Beam search takes the prompts one at
        a time, each with its ``num_beams`` hypotheses as the batch.
        """
        prompts = self._check(prompts, config)
        if config.num_beams > 1:
            return self._beam_search_all(prompts, config)
        seqs: list[_Sequence] = []
        prefill_s = 0.0
        for seqs, prefill_s in self._decode_steps(prompts, config):
            pass
        return [s.result(prefill_s) for s in seqs]

    def stream(self, prompt: list[int], config: GenerationConfig) -> Iterator[str]:
        """Yield the generated text of one prompt piece by piece, as it is produced.

        Pieces never split a UTF-8 character and never contain a stop string or a part of one:
        text that could be the start of a stop string is held back until it is clear. The pieces
        join to ``result.text``; after the iterator is exhausted ``self.last_result`` holds the
        ``GenerationResult``. Beam search cannot know its best hypothesis before the end, so with
        ``num_beams > 1`` the whole text comes as one piece.
        """
        self.last_result = None
        # Checked here, not in the generator below, so bad input fails at the call.
        prompts = self._check([prompt], config)
        return self._stream(prompts, config)

    @torch.inference_mode()
    def _stream(self, prompts: list[list[int]], config: GenerationConfig) -> Iterator[str]:
        if config.num_beams > 1:
            (result,) = self._beam_search_all(prompts, config)
            self.last_result = result
            if result.text:
                yield result.text
            return
        seq: _Sequence | None = None
        prefill_s = 0.0
        for (seq,), prefill_s in self._decode_steps(prompts, config):
            piece = seq.new_text()
            if piece:
                yield piece
        assert seq is not None
        self.last_result = seq.result(prefill_s)

    # ---------------------------------------------------------------- checks

    def _check(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> list[list[int]]:
        """Validate the config and the prompts; return the prompts as lists of ints."""
        config.validate()
        if not prompts:
            raise ValueError("generate: no prompts given (expected a list of token-id lists)")
        n_model, context = self.model.config.vocab_size, self.model.config.max_seq_len
        out = []
        for i, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"generate: prompt {i} is empty (expected at least one token)")
            if min(prompt) < 0 or max(prompt) >= n_model:
                raise ValueError(f"generate: prompt {i} has a token id outside the model's vocabulary "
                                 f"(0..{n_model - 1})")
            if len(prompt) + config.max_new_tokens > context:
                raise ValueError(f"generate: prompt {i} ({len(prompt)} tokens) + max_new_tokens "
                                 f"({config.max_new_tokens}) exceeds the model's context of {context} tokens")
            out.append(prompt)
        if config.num_beams > 1 and config.num_beams * 2 > self.n_vocab:
            raise ValueError(f"GenerationConfig.num_beams={config.num_beams}: expected at most half the "
                             f"vocabulary ({self.n_vocab // 2})")
        return out

    def _new_sequence(self, prompt: list[int], config: GenerationConfig) -> _Sequence:
        stop_ids = self.tokenizer.stop_ids if config.stop_ids is None else config.stop_ids
        seq = _Sequence(prompt, self.tokenizer.decode, frozenset(stop_ids), tuple(config.stop_strings),
                        config.max_new_tokens, config.logprobs)
        if config.json_object:
            from llamalab.generate.constrain import JSONConstraint, token_table

            seq.constraint = JSONConstraint(token_table(self.tokenizer, self.n_vocab))
        return seq

    def _prefill(self, tokens: Tensor, last: Tensor) -> Tensor:
        """Run (B, L) prompt tokens at positions 0..L-1 into the cache; return each row's logits at
        position ``last[row]``, (B, V) fp32."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if isinstance(self.model, (Transformer, DecodeModel)):
            # Apply the output head to the B positions we need only: full logits of a long prompt
            # are L x vocab floats per row (8k x 128k x 4 bytes = 4 GiB for Llama 3).
            hidden = self.model.hidden_states(tokens, input_pos=positions)
            return self.model.output(hidden[rows, last]).float()
        return self.model(tokens, input_pos=positions)[rows, last]

    def _torch_generator(self, seed: int | None) -> torch.Generator | None:
        # One generator per call: the same seed gives the same draws whatever ran before.
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    # ---------------------------------------------------------------- greedy / sampling

    def _decode_steps(self, prompts: list[list[int]], config: GenerationConfig
                      ) -> Iterator[tuple[list[_Sequence], float]]:
        """Generate for a batch of prompts; yield (sequences, prefill_s) after each step.

        The sequences are updated in place. Time spent by the consumer between steps (a slow
        stream reader) is not counted in the sequences' ``decode_s``.
        """
        device, n_vocab = self.device, self.n_vocab
        seqs = [self._new_sequence(p, config) for p in prompts]
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        generator = self._torch_generator(config.seed)
        penalise = config.repetition_penalty != 1.0
        self.model.setup_cache(max_batch_size=len(prompts), max_seq_len=longest + config.max_new_tokens)
        try:
            t0 = time.perf_counter()
            # Each distinct prompt is prefilled once (K samples of one prompt, as rejection sampling
            # and `n` completions ask for, share its cache rows), right-padded (see the module
            # docstring; the pad id is arbitrary), then copied to the rows that repeat it.
            distinct: dict[tuple[int, ...], int] = {}
            rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
            uniq = [list(p) for p in distinct]
            u_longest = max(len(p) for p in uniq)
            tokens = torch.zeros(len(uniq), u_longest, dtype=torch.long, device=device)
            for i, p in enumerate(uniq):
                tokens[i, : len(p)] = torch.tensor(p, device=device)
            last = torch.tensor([len(p) for p in uniq], device=device) - 1
            logits = self._prefill(tokens, last)[:, :n_vocab]
            if len(uniq) < len(prompts):
                index = torch.tensor(rows, device=device)
                self._reorder_cache(index)
                logits = logits.index_select(0, index)
            seen = seen_mask(prompts, n_vocab, device) if penalise else None
            next_ids = self._choose(logits, config, seen, generator, seqs)
            prefill_s = time.perf_counter() - t0
            yield seqs, prefill_s

            pos = torch.tensor(lengths, device=device).unsqueeze(1)  # (B, 1): each row at its own position
            rows = list(seqs)  # the sequence in each cache row
            decode_s = 0.0
            while not all(s.finished for s in seqs):
                t0 = time.perf_counter()
                # Finished rows keep stepping and their tokens are ignored until few enough are left
                # for a smaller batch to pay (`_worth_compacting`): then the running rows are moved
                # to the front of the cache and the batch shrinks.
                live = [i for i, s in enumerate(rows) if not s.finished]
                if _worth_compacting(len(rows), len(live)):
                    index = torch.tensor(live, device=device)
                    self._compact_cache(index)
                    rows = [rows[i] for i in live]
                    next_ids, pos = next_ids.index_select(0, index), pos.index_select(0, index)
                    if seen is not None:
                        seen = seen.index_select(0, index)
                # One row passes plain (1,) positions: the model's simplest (and fastest) path.
                input_pos = pos[0] if len(rows) == 1 else pos
                logits = self.model(next_ids.unsqueeze(1), input_pos=input_pos)[:, -1, :n_vocab]
                pos += 1
                if seen is not None:
                    seen[torch.arange(len(rows), device=device), next_ids] = True
                running = [s for s in rows if not s.finished]
                next_ids = self._choose(logits, config, seen, generator, rows)
                decode_s += time.perf_counter() - t0
                for s in running:
                    s.decode_s = decode_s
                yield seqs, prefill_s
        finally:
            self.model.clear_cache()

    def _choose(self, logits: Tensor, config: GenerationConfig, seen: Tensor | None,
                generator: torch.Generator | None, seqs: list[_Sequence]) -> Tensor:
        """Pick each row's next id from (B, V) logits and add it to the unfinished sequences."""
        processed = process_logits(biased(logits, config.logit_bias), temperature=config.temperature,
                                   top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                                   repetition_penalty=config.repetition_penalty, seen=seen)
        next_ids = choose_next(processed, config.temperature, generator)
        chosen = next_ids.tolist()  # one host sync per step: stop checks need the ids
        if config.json_object:
            from llamalab.generate.constrain import constrained_next

            for i, seq in enumerate(seqs):
                if not seq.finished and seq.constraint is not None:
                    chosen[i] = constrained_next(processed[i], config.temperature, generator, seq.constraint,
                                                 chosen[i], raw=logits[i])
            next_ids = torch.tensor(chosen, device=next_ids.device)
        logprobs: list[float | None] = [None] * len(seqs)
        if config.logprobs:
            raw = torch.log_softmax(logits, dim=-1).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
            logprobs = raw.tolist()
        for seq, token, logprob in zip(seqs, chosen, logprobs):
            if not seq.finished:
                seq.add(token, logprob)
        return next_ids

    # ---------------------------------------------------------------- beam search

    def _beam_search_all(self, prompts: list[list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Beam search for each prompt in turn; one cache of ``num_beams`` rows serves them all."""
        longest = max(len(p) for p in prompts)
        self.model.setup_cache(max_batch_size=config.num_beams, max_seq_len=longest + config.max_new_tokens)
        try:
            return [self._beam_search(p, config) for p in prompts]
        finally:
            self.model.clear_cache()

    def _compact_cache(self, rows: Tensor) -> None:
        """Move cache rows ``rows`` to rows 0..len(rows)-1 in every layer (the rest is left as it is)."""
        n = len(rows)
        for cache in (m for m in self.model.modules() if isinstance(m, KVCache)):
            cache.k[:n] = cache.k.index_select(0, rows)  # index_select copies: overlapping rows are safe
            cache.v[:n] = cache.v.index_select(0, rows)

    def _reorder_cache(self, rows: Tensor) -> None:
        """Make cache row j a copy of row ``rows[j]`` in every layer (beams follow their parents)."""
        # Found by type rather than through `model.layers`, so a wrapper that borrows the model's
        # caches (such as an inference-optimised module) works too.
        for cache in (m for m in self.model.modules() if isinstance(m, KVCache)):
            # Copy in place so the preallocated buffers stay the same tensors.
            cache.k.copy_(cache.k.index_select(0, rows))
            cache.v.copy_(cache.v.index_select(0, rows))

    def _beam_search(self, prompt: list[int], config: GenerationConfig) -> GenerationResult:
        """Beam search as ``transformers.generate(num_beams=K, do_sample=False)`` does it.

        Each step every running beam proposes every token; the ``n_keep`` best by total log-prob
        are kept. Candidates among the best K that hit a stop (stop id, stop string or the length
        limit) become finished hypotheses scored ``sum_logprobs / generated_len ** length_penalty``
        (the best K are kept); the best K others run on. ``n_keep`` is ``max(2, 1 + n_stop_ids) * K``
        so that K candidates remain even when every beam's best continuations are stop ids. The
        search ends when no candidate can run on; with ``early_stopping`` when K hypotheses are
        finished; without it when the best running beam can no longer beat the worst finished one
        at its current length (transformers' heuristic).
        """
        device, n_vocab, k = self.device, self.n_vocab, config.num_beams
        root = self._new_sequence(prompt, config)
        n_keep = min(max(2, 1 + len(root.stop_ids)) * k, n_vocab)
        penalise = config.repetition_penalty != 1.0

        t0 = time.perf_counter()
        logits = self._prefill(torch.tensor([prompt], device=device),
                               torch.tensor([len(prompt) - 1], device=device))[:, :n_vocab]
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # The search starts from one beam: transformers starts K copies of the prompt with all but
        # the first scored -1e9, which selects the same candidates.
        beams = [root]
        scores = torch.zeros(1, device=device)
        seen = seen_mask([prompt], n_vocab, device) if penalise else None
        finished: list[tuple[float, _Sequence]] = []
        improvable = True
        for step in range(config.max_new_tokens):
            gen_len = step + 1
            logprobs = torch.log_softmax(biased(logits, config.logit_bias), dim=-1)
            # transformers penalises the log-probs (not the logits) in beam search; so do we.
            processed = apply_repetition_penalty(logprobs, seen, config.repetition_penalty) if penalise else logprobs
            total = (processed + scores[:, None]).flatten()
            top_scores, top_index = torch.topk(total, n_keep)
            parents, tokens = (top_index // n_vocab).tolist(), (top_index % n_vocab).tolist()
            raw = logprobs[top_index // n_vocab, top_index % n_vocab].tolist() if config.logprobs else [None] * n_keep
            candidates = [beams[b].extended(t, lp) for b, t, lp in zip(parents, tokens, raw)]
            hit = torch.tensor([c.finished for c in candidates], device=device)

            # Only the best K candidates may finish; the others exist to keep K beams running.
            if improvable and not (config.early_stopping and len(finished) == k):
                final = (top_scores / (gen_len ** config.length_penalty)).tolist()
                finished += [(final[r], candidates[r]) for r in range(k) if candidates[r].finished]
                finished = sorted(finished, key=lambda f: f[0], reverse=True)[:k]

            # The best K candidates that did not finish run on.
            run_scores = top_scores + hit.float() * -1.0e9
            keep = torch.topk(run_scores, k).indices
            scores = run_scores[keep]
            beams = [candidates[r] for r in keep.tolist()]

            # Can the best running beam still beat the worst finished hypothesis at this length?
            best_possible = float(scores[0]) / (gen_len ** config.length_penalty)
            worst = finished[-1][0] if len(finished) == k else -1.0e9
            improvable = improvable and best_possible > worst
            if (not improvable or (config.early_stopping and len(finished) == k)
                    or bool(hit.all()) or step + 1 == config.max_new_tokens):
                break

            rows = top_index[keep] // n_vocab
            self._reorder_cache(rows)
            new_ids = top_index[keep] % n_vocab
            if seen is not None:
                seen = seen.index_select(0, rows)
                seen[torch.arange(k, device=device), new_ids] = True
            pos = torch.tensor([len(prompt) + step], device=device)
            logits = self.model(new_ids.unsqueeze(1), input_pos=pos)[:, -1, :n_vocab]

        best = finished[0][1] if finished else beams[0]
        best.decode_s = time.perf_counter() - t0
        return best.result(prefill_s)


class _IdsOnly:
    """The little of a tokenizer that ``greedy_generate`` needs: no text, no stop ids of its own."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.stop_ids: frozenset[int] = frozenset()

    def decode(self, ids: Sequence[int]) -> str:
        """No text: ``greedy_generate`` callers decode for themselves."""
        return ""


@torch.inference_mode()
def greedy_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
                    stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
                    vocab_limit: int | None = None) -> GenerationResult:
    """Greedy decoding of one prompt; ``on_token`` sees each new id as it is chosen.

    A thin wrapper over ``Generator`` for callers without a tokenizer (the result's ``text`` is
    empty). ``vocab_limit`` keeps the choice among ids below it.
    """
    if not prompt_ids:
        raise ValueError("greedy_generate: the prompt is empty (expected at least one token)")
    gen = Generator(model, _IdsOnly(model.config.vocab_size), vocab_limit=vocab_limit)  # type: ignore[arg-type]
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids))
    prompts = gen._check([prompt_ids], config)
    seq: _Sequence | None = None
    prefill_s, seen = 0.0, 0
    for (seq,), prefill_s in gen._decode_steps(prompts, config):
        for token in seq.ids[seen:]:
            if on_token is not None:
                on_token(token)
        seen = len(seq.ids)
    assert seq is not None
    return seq.result(prefill_s)


class TextStreamer:
    """Turns ids into text pieces without ever splitting a UTF-8 character.

    Byte-fallback and byte-level tokens can end mid-character; the text is decoded from
    all ids so far and a piece is released only when it does not end in U+FFFD.
    """

    def __init__(self, decode: Callable[[list[int]], str], skip_ids: Iterable[int] = ()) -> None:
        self.decode = decode
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
