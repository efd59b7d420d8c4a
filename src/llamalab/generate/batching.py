"""Continuous batching: requests join and leave one running decode batch at token boundaries.

A CPU decode step is bound by reading the weights: one step for 8 sequences reads them once, as
one step for 1 does, so a server that decodes its requests together multiplies its throughput.
:class:`ContinuousBatcher` keeps a batch of up to ``max_batch`` sequences; each :meth:`step`

1. drops the sequences whose clients cancelled them,
2. admits waiting requests into the free rows: their prompts prefilled together (right-padded,
   as :class:`~llamalab.generate.Generator` batches them) straight into their own cache rows,
   each choosing its first token,
3. runs one decode step for every running sequence at its own position, each choosing its next
   token with its own settings (temperature, top-k/p, min-p, repetition penalty, seed, stop ids
   and strings, log-probs),
4. retires the finished ones at once.

The KV cache is in **slots**: ``max_batch`` rows of ``max_seq_len`` positions, the model's own
static cache layout, kept dense: the running sequences are rows ``0..B-1``, so that a step
reads ``cache[:B]`` as the engine's batched decode does, and a sequence that finishes has the
last row's cache moved into its place (only its filled positions are copied). Slots rather than
paged blocks: the attention kernels (SDPA, llamalab's decode kernel) read each row's keys as
one contiguous run, and on CPU a slot of SmolLM2 at 4096 positions is 190 MB at fp32, so a few
slots fit in memory at full length; what slots waste is the unused tail of each row, bounded by
``max_batch * max_seq_len`` and allocated once. (Paged blocks pay when many long sequences of
very different lengths share a GPU's memory.)

The batcher owns its cache: it is put into the model's attention layers for the length of a step
only, so the same model can still serve plain :class:`~llamalab.generate.Generator` calls between
steps. One thread drives :meth:`step` (the server's worker); :meth:`submit` and
:meth:`BatchRequest.cancel` may be called from any thread.

The sequences' tokens, text, stop handling and streaming are the engine's (``_Sequence``), the
sampling its processors: this is the engine's loop with rows that come and go, not a second one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llamalab.generate.constrain import constrained_next
from llamalab.generate.engine import GenerationConfig, GenerationResult, Generator, _Sequence, biased
from llamalab.generate.fast import DecodeModel
from llamalab.generate.sampling import argmax_rows, choose_next, process_logits, seen_mask
from llamalab.model import Attention, KVCache, Transformer

__all__ = ["BatchRequest", "ContinuousBatcher"]


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class BatchRequest:
    """One prompt's generation inside a :class:`ContinuousBatcher`.

    ``on_token(request)`` runs on the batcher's thread after each new token (``request.seq``
    holds the ids and the text: ``seq.new_text()`` is the next piece to stream); ``on_done``
    once, when it finished (``result`` set) or was cancelled (``cancelled``; ``result`` None).
    """

    prompt: list[int]
    config: GenerationConfig
    seq: _Sequence
    generator: torch.Generator | None = None
    on_token: Callable[[BatchRequest], None] | None = None
    on_done: Callable[[BatchRequest], None] | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None  # when the first token was chosen (time to first token)
    token_times: list[float] = field(default_factory=list)  # when each token was chosen
    prefill_s: float = 0.0
    result: GenerationResult | None = None
    reused: int = 0  # prompt tokens whose keys and values came from the prefix cache
    _cancel: threading.Event = field(default_factory=threading.Event)
    _seen: Tensor | None = None

    def cancel(self) -> None:
        """Stop generating (from any thread): the sequence leaves the batch at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        """Whether it is over: finished (``result`` set) or cancelled."""
        return self.result is not None or self.cancelled


class ContinuousBatcher:
    """A decode batch of up to ``max_batch`` sequences that requests join and leave between steps.

    ``generator``: the :class:`~llamalab.generate.Generator` whose model, tokenizer and vocabulary
    limit are used. ``max_seq_len``: positions per slot (prompt + new tokens; default the model's
    context). ``max_prefill_tokens``: prompt tokens prefilled in one step at most (those a cached
    prefix supplies not counted; a longer prompt still gets in, alone), so that newcomers do not
    stall the running sequences for long.
    ``prefix_cache_size``: prompt prefixes (of ``min_prefix`` tokens or more) whose keys and values
    are kept, so that a prompt starting with one prefills only the rest (0: off).
    """

    def __init__(self, generator: Generator, *, max_batch: int = 8, max_seq_len: int | None = None,
                 max_prefill_tokens: int = 4096, prefix_cache_size: int = 8, min_prefix: int = 16) -> None:
        model = generator.model
        base = model.model if isinstance(model, DecodeModel) else model
        if not isinstance(base, Transformer):
            raise TypeError(f"ContinuousBatcher needs a llamalab Transformer (or its DecodeModel), got "
                            f"{type(model).__name__}")
        context = base.config.max_seq_len
        max_seq_len = max_seq_len or context
        if not 1 <= max_seq_len <= context:
            raise ValueError(f"ContinuousBatcher: max_seq_len={max_seq_len} must be in [1, {context}] "
                             "(the model's context)")
        if max_batch < 1:
            raise ValueError(f"ContinuousBatcher: max_batch={max_batch} must be at least 1")
        if max_prefill_tokens < 1:
            raise ValueError(f"ContinuousBatcher: max_prefill_tokens={max_prefill_tokens} must be at least 1")
        self.generator = generator
        self.model = model
        self.base = base
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self._attentions = [m for m in base.modules() if isinstance(m, Attention)]
        for a in self._attentions:  # kv_cache as an entry of the submodule table (None until set), which
            if "kv_cache" not in a._modules:  # _in_model swaps directly (an unset one is a plain attribute)
                a._modules["kv_cache"] = a.__dict__.pop("kv_cache", None)
        self._quantized = any(type(m).__name__ == "QuantizedLinear" for m in base.modules())
        self._caches: list[KVCache] | None = None  # allocated at the first step
        self._lock = threading.Lock()
        self._waiting: deque[BatchRequest] = deque()
        self.rows: list[BatchRequest] = []  # the running sequences, in cache-row order
        self._pos: list[int] = []  # each row's next position
        self._next: list[int] = []  # each row's last chosen token (the next step's input)
        self.steps = 0  # decode steps run
        self.admitted = 0  # requests prefilled
        self.peak = 0  # the largest batch decoded
        # Prefix caching: the keys and values of prompt prefixes that recent prompts shared.
        self.prefix_cache_size = prefix_cache_size
        self.min_prefix = min_prefix
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = OrderedDict()  # LRU
        self._recent: deque[list[int]] = deque(maxlen=16)
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0

    # ---------------------------------------------------------------- submitting

    def submit(self, prompt: list[int], config: GenerationConfig, *,
               on_token: Callable[[BatchRequest], None] | None = None,
               on_done: Callable[[BatchRequest], None] | None = None,
               generator: torch.Generator | None = None) -> BatchRequest:
        """Queue one prompt; returns its :class:`BatchRequest` (ValueError for bad input, at once).

        ``generator``: the random draws' source (several requests of one client call may share
        one); default: one seeded with ``config.seed`` when set.
        """
        (prompt,) = self.generator._check([prompt], config)
        if config.num_beams > 1:
            raise ValueError("ContinuousBatcher: beam search (num_beams > 1) does not batch with other "
                             "requests; use Generator.generate")
        if len(prompt) + config.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
                             f"the batch's slot length of {self.max_seq_len} tokens")
        if generator is None and config.seed is not None:
            generator = self.generator._torch_generator(config.seed)
        request = BatchRequest(prompt, config, self.generator._new_sequence(prompt, config), generator,
                               on_token, on_done)
        with self._lock:
            self._waiting.append(request)
        return request

    @property
    def waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in the batch."""
        return len(self.rows)

    def has_work(self) -> bool:
        """Whether a :meth:`step` would do anything."""
        return bool(self.rows or self._waiting)

    # ---------------------------------------------------------------- stepping

    @torch.inference_mode()
    def step(self) -> int:
        """Admit, decode one token for every running sequence, retire; returns the batch size run."""
        self._retire([i for i, r in enumerate(self.rows) if r.cancelled])
        with self._lock:  # the cancelled among the waiting, whether or not a row is free
            gone = [r for r in self._waiting if r.cancelled]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for r in gone:
            self._finish(r)
        with self._in_model():
            self._admit()
            self._retire([i for i, r in enumerate(self.rows) if r.finished])
            if not self.rows:
                return 0
            batch = len(self.rows)
            self.peak = max(self.peak, batch)
            self._decode()
        self._retire([i for i, r in enumerate(self.rows) if r.finished])
        return batch

    def run_until_done(self) -> None:
        """Step until nothing is waiting or running (for scripts and tests)."""
        while self.has_work():
            self.step()

    def close(self) -> None:
        """Cancel everything and free the cache."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting + self.rows:
            r.cancel()
            self._finish(r)
        self.rows, self._pos, self._next = [], [], []
        self._caches = None

    # ---------------------------------------------------------------- internals

    def _cache(self) -> list[KVCache]:
        if self._caches is None:
            c, w = self.base.config, self.base.tok_embeddings.weight
            dtype = self.base.kv_cache_dtype or w.dtype  # as Transformer.setup_cache: alone and batched alike
            self._caches = [KVCache(self.max_batch, self.max_seq_len, c.n_kv_heads, c.head_dim, dtype, w.device)
                            for _ in self._attentions]
        return self._caches

    @contextmanager
    def _in_model(self, caches: list[KVCache] | None = None) -> Iterator[None]:
        """Put the batch's caches (or ``caches``: views of some rows) into the model for a while."""
        caches = caches or self._cache()
        # Straight into each layer's submodule table: nn.Module's __setattr__ (its checks, twice a layer
        # a step) cost ~0.5 ms of a 7-14 ms step, and its effect here is just this assignment.
        slots = [a._modules for a in self._attentions]
        saved = [m["kv_cache"] for m in slots]
        saved_len = self.base.cache_len
        for m, c in zip(slots, caches):
            m["kv_cache"] = c
        self.base.cache_len = self.max_seq_len
        try:
            yield
        finally:
            for m, c in zip(slots, saved):
                m["kv_cache"] = c
            self.base.cache_len = saved_len

    def _admit(self) -> None:
        """Prefill waiting requests into the free rows, together, and choose their first tokens."""
        new: list[BatchRequest] = []
        hits: list[tuple[tuple[int, ...], list[tuple[Tensor, Tensor]]] | None] = []
        tokens_in = 0
        with self._lock:
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                r = self._waiting[0]
                hit = self._cached_prefix(r.prompt)
                n = len(r.prompt) - (0 if hit is None else len(hit[0]))  # what is prefilled: the rest
                if new and tokens_in + n > self.max_prefill_tokens:
                    break
                new.append(self._waiting.popleft())
                hits.append(hit)
                tokens_in += n
        if not new:
            return
        t0 = time.perf_counter()
        device, first = self.base.tok_embeddings.weight.device, len(self.rows)
        caches = self._cache()
        starts = [0 if hit is None else len(hit[0]) for hit in hits]
        # Prompts shorter than the quantized kernels' prompt-tile length are prefilled apart from the
        # longer ones: padded to it by a longer newcomer they would take the other rounding than alone.
        cut = self._prompt_tiles_from()
        order = sorted(range(len(new)), key=lambda i: len(new[i].prompt) - starts[i] >= cut) if cut else None
        if order is not None:
            new, hits, starts = [new[i] for i in order], [hits[i] for i in order], [starts[i] for i in order]
        # A cached prefix's keys and values copied into the newcomer's row: only the rest is prefilled.
        for i, (r, hit) in enumerate(zip(new, hits)):
            if hit is not None:
                key, kv = hit
                for c, (k, v) in zip(caches, kv):
                    c.k[first + i, :, : len(key)] = k
                    c.v[first + i, :, : len(key)] = v
                self.prefix_hits += 1
                self.prefix_tokens_reused += len(key)
            r.reused = starts[i]
        rest = [r.prompt[s0:] for r, s0 in zip(new, starts)]
        groups = [list(range(len(new)))]
        if cut:
            short = [i for i, t in enumerate(rest) if len(t) < cut]
            if 0 < len(short) < len(new):
                groups = [short, list(range(len(short), len(new)))]
        logits = torch.cat([self._prefill_rows(first + g[0], [rest[i] for i in g], [starts[i] for i in g])
                            for g in groups])
        now = time.perf_counter()
        for i, r in enumerate(new):
            r.prefill_s = now - t0
            if r.config.repetition_penalty != 1.0:
                r._seen = seen_mask([r.prompt], self.generator.n_vocab, device)
            self._remember_prefix(r.prompt, first + i)
            self.rows.append(r)
            self._pos.append(len(r.prompt))
            self._next.append(self._choose(r, logits[i]))
        self.admitted += len(new)

    def _prefill_rows(self, row: int, rest: list[list[int]], starts: list[int]) -> Tensor:
        """Prefill the prompts' remaining tokens ``rest`` (each from position ``starts[i]``) together
        into the cache rows from ``row``; their logits at their last tokens, (B, V) fp32."""
        device = self.base.tok_embeddings.weight.device
        longest = max(len(t) for t in rest)
        tokens = torch.zeros(len(rest), longest, dtype=torch.long, device=device)
        for i, t in enumerate(rest):
            tokens[i, : len(t)] = torch.tensor(t, device=device)
        last = torch.tensor([len(t) - 1 for t in rest], device=device)
        span = torch.arange(longest, device=device)
        # From position 0 for every row: the (S,) positions of a plain prefill (causal attention, no
        # mask); else each row from its own start (a (B, S) mask over the cached part and its own).
        positions = span if not any(starts) else torch.tensor(starts, device=device).unsqueeze(1) + span
        if int(positions.max()) >= self.max_seq_len:  # right padding past the slot's end: one at a time
            positions = None
        # The newcomers' rows of the cache as a batch of their own: the prefill writes there.
        with self._in_model([c.rows(row, len(rest)) for c in self._cache()]):
            if positions is None:
                return torch.cat([self._prefill(tokens[i:i + 1, : len(t)], torch.arange(starts[i], starts[i] + len(t),
                                                                                     device=device).unsqueeze(0),
                                                last[i:i + 1]) for i, t in enumerate(rest)])
            return self._prefill(tokens, positions, last)

    def _prompt_tiles_from(self) -> int:
        """The prompt length from which the quantized kernels change rounding (0: none, or a float model)."""
        if not self._quantized:
            return 0
        from llamalab.quant import kernels

        return kernels.bf16_min_tokens()

    def _prefill(self, tokens: Tensor, positions: Tensor, last: Tensor) -> Tensor:
        """Run (B, S) tokens at ``positions`` ((S,) or (B, S)) into the cache; each row's logits at
        column ``last[row]``, (B, V) fp32 (the output head applied there only)."""
        hidden = self.model.hidden_states(tokens, input_pos=positions)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.model.output(hidden[rows, last]).float()[:, : self.generator.n_vocab]

    # ---------------------------------------------------------------- prefix caching

    def _cached_prefix(self, prompt: list[int]) -> tuple[tuple[int, ...], list[tuple[Tensor, Tensor]]] | None:
        """The longest run of ``prompt``'s first tokens (``min_prefix`` or more, leaving at least one
        to prefill, or for a quantized model with prompt tiles at least their length) that a cached
        prefix starts with, and that run's keys and values.

        A cached prefix serves any prompt sharing only its first L tokens: the keys and values of
        position i depend on tokens 0..i alone. (Matching whole cached prefixes only, a system
        prompt cached with the first words of one question missed every other question.)"""
        best: tuple[int, tuple[int, ...]] | None = None
        # At least the quantized kernels' prompt-tile length left to prefill (where they have one): the
        # prompt alone takes those tiles for every position, and a shorter rest would take the int8
        # products, which round otherwise. (Every kept position was computed on the tiles too: only
        # prompts of that length or more are remembered, and their rest was prefilled by this rule.)
        left = max(1, self._prompt_tiles_from())
        for key in self._prefixes:
            n = min(_shared(prompt, key), len(prompt) - left)
            if n >= self.min_prefix and (best is None or n > best[0]):
                best = (n, key)
        if best is None:
            return None
        n, key = best
        self._prefixes.move_to_end(key)
        return tuple(prompt[:n]), [(k[:, :n], v[:, :n]) for k, v in self._prefixes[key]]

    def _remember_prefix(self, prompt: list[int], row: int) -> None:
        """Cache the prefix ``prompt`` shares with a recent prompt (a chat template's system prompt,
        a few-shot preamble), from the row just prefilled, if it is long enough and no cached prefix
        already starts with it; a cached prefix it extends is replaced."""
        if self.prefix_cache_size == 0 or len(prompt) < self._prompt_tiles_from():
            return
        best = max((_shared(prompt, other) for other in self._recent), default=0)
        self._recent.append(prompt)
        best = min(best, len(prompt) - 1)
        if best < self.min_prefix:
            return
        new = tuple(prompt[:best])
        for key in list(self._prefixes):
            n = _shared(new, key)
            if n >= best:  # a cached prefix starts with this one: it serves it already
                self._prefixes.move_to_end(key)
                return
            if n == len(key):  # this one extends a cached prefix: keep the longer
                del self._prefixes[key]
        self._prefixes[new] = [(c.k[row, :, :best].clone(), c.v[row, :, :best].clone()) for c in self._cache()]
        while len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)

    def _decode(self) -> None:
        """One token for every running row, each at its own position."""
        device = self.base.tok_embeddings.weight.device
        batch = len(self.rows)
        ids = torch.tensor(self._next, device=device).view(batch, 1)
        pos = torch.tensor(self._pos, device=device)
        # One row passes plain (1,) positions: the model's batch-1 path (the decode kernel's).
        input_pos = pos if batch == 1 else pos.view(batch, 1)
        logits = self.model(ids, input_pos=input_pos)[:, -1, : self.generator.n_vocab]
        self.steps += 1
        argmax = argmax_rows(logits).tolist()  # the greedy rows' choice, one call for the batch
        for i, r in enumerate(self.rows):
            self._pos[i] += 1
            self._next[i] = self._choose(r, logits[i], argmax[i])

    def _choose(self, r: BatchRequest, logits: Tensor, argmax: int | None = None) -> int:
        """Row ``r``'s next token from its (V,) logits (``argmax``: theirs, if known), with its own
        settings; streams it."""
        cfg = r.config
        row = logits.unsqueeze(0)
        processed = None
        if cfg.temperature == 0 and r._seen is None and not cfg.logit_bias:
            token = int(argmax_rows(row)[0]) if argmax is None else argmax
        else:
            processed = process_logits(biased(row, cfg.logit_bias), temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                       min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty, seen=r._seen)
            token = int(choose_next(processed, cfg.temperature, r.generator)[0])
        if r.seq.constraint is not None:
            token = constrained_next(row[0] if processed is None else processed[0], cfg.temperature, r.generator,
                                     r.seq.constraint, token, raw=row[0])
        if r._seen is not None:
            r._seen[0, token] = True
        logprob = float(torch.log_softmax(row, dim=-1)[0, token]) if cfg.logprobs else None
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
        r.token_times.append(now)
        r.seq.add(token, logprob)
        r.seq.decode_s = now - r.first_token_at
        if r.on_token is not None:
            r.on_token(r)
        if r.seq.finished:
            r.result = r.seq.result(r.prefill_s)
        return token

    def _retire(self, rows: list[int]) -> None:
        """Take rows out of the batch, the last row's cache moved into each hole (rows stay dense)."""
        for i in sorted(rows, reverse=True):
            r = self.rows[i]
            last = len(self.rows) - 1
            if i != last:
                filled = self._pos[last]
                for c in self._cache():
                    c.k[i, :, :filled] = c.k[last, :, :filled]
                    c.v[i, :, :filled] = c.v[last, :, :filled]
                self.rows[i], self._pos[i], self._next[i] = self.rows[last], self._pos[last], self._next[last]
            self.rows.pop()
            self._pos.pop()
            self._next.pop()
            self._finish(r)

    @staticmethod
    def _finish(r: BatchRequest) -> None:
        if r.on_done is not None:
            callback, r.on_done = r.on_done, None  # once
            callback(r)
