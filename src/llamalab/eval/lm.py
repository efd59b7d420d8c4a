"""``EvalModel``: a llamalab model seen the way evaluation harnesses see a language model.

Three questions are asked of it, as in lm-eval's ``LM`` interface:

- ``loglikelihood([(context, continuation), ...])``: the summed log-probability of each
  continuation given its context, and whether greedy decoding would have produced it;
- ``loglikelihood_rolling([text, ...])``: the log-probability of whole texts (perplexity),
  in disjoint windows of the context length;
- ``generate_until([prompt, ...], until=[...])``: greedy continuations cut at stop strings.

Tokenisation follows lm-eval's ``_encode_pair`` so scores are comparable with lm-eval's:
the context's trailing spaces move to the continuation, the whole text is encoded and split at
the context's token count, an empty context becomes the BOS (or EOS) token.

Scoring reuses work: the requests are grouped by context, and each batch of contexts runs in
three stages on the model's KV cache -- the prefix all contexts of the batch share (once),
the rest of each context (once per context), then every continuation of every context as one
batch continuing from its context's cache rows. The shared prefix is also kept for the next
batch, so a few-shot prompt common to a whole task (or MMLU subject) runs once. The scores equal
scoring each (context + continuation) from scratch up to float rounding (``tests/test_eval_lm.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llamalab.model import Transformer

if TYPE_CHECKING:
    from llamalab.api import LoadedModel

__all__ = ["EvalModel", "common_prefix_len", "length_batches", "sliding_windows"]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Request:
    """One (context, continuation) pair in tokens, and where its answer goes."""

    index: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]


class EvalModel:
    """A model and tokenizer, with the scoring and generation calls evaluation needs.

    ``batch_size`` is the number of continuation rows scored in one forward pass (and of
    prompts generated together). ``max_length`` defaults to the model's context length.
    """

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 16, max_length: int | None = None,
                 name: str | None = None, fast: bool = True) -> None:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path}: no tokenizer found beside the weights; evaluation needs one")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
        self.loaded = loaded
        self.model: Transformer = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.batch_size = batch_size
        context = loaded.config.max_seq_len
        if max_length is not None and not 2 <= max_length <= context:
            raise ValueError(f"max_length={max_length}: expected 2..{context} (the model's context)")
        self.max_length = max_length or context
        self.name = name or str(loaded.path)
        self.add_bos = bool(getattr(self.tokenizer, "add_bos_default", False))
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        prefix = bos if bos is not None else eos
        if prefix is None:
            raise ValueError(f"{self.name}: the tokenizer has neither a BOS nor an EOS token to "
                             "condition an empty context on")
        self.prefix_token_id: int = prefix
        self.truncated = 0  # requests whose context was cut on the left to fit max_length
        # What one more forward pass costs, in padded tokens: continuations are split into passes
        # of similar lengths only where that saves more (see ``length_batches``).
        self.pass_overhead = 32
        self._runner = self._fast_runner() if fast else None
        self._generator: Any = None
        # The last shared prefix run (tokens, per-layer keys and values), reused by the next chunk.
        self._prefix: tuple[tuple[int, ...], list[tuple[Tensor, Tensor]]] | None = None

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str], *, dtype: torch.dtype | None = torch.float32,
             batch_size: int = 16, max_length: int | None = None, device: str = "cpu") -> EvalModel:
        """Load a checkpoint (path or registered name) for evaluation; fp32 by default (None: as
        stored, a quantized GGUF in its blocks, see :func:`llamalab.load`)."""
        from llamalab.api import load

        return cls(load(name_or_path, dtype=dtype, device=device), batch_size=batch_size,
                   max_length=max_length, name=str(name_or_path))

    def _fast_runner(self) -> Any:
        """The oneDNN forward pass of ``generate.fast`` (same function, ~2-3x faster on CPU), or None."""
        from llamalab.generate.fast import onednn_available, optimize_for_decode

        device = self.model.tok_embeddings.weight.device
        if isinstance(self.model, Transformer) and onednn_available(device):
            return optimize_for_decode(self.model)
        return None

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.model.tok_embeddings.weight.device

    # ---------------------------------------------------------------- tokenisation

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS when the tokenizer asks for it (as lm-eval's ``tok_encode``)."""
        return self.tokenizer.encode(text, bos=self.add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as lm-eval splits them (see the module docstring)."""
        if not context:
            cont = self.tokenizer.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---------------------------------------------------------------- scoring

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress: bool = False
                      ) -> list[tuple[float, bool]]:
        """Sum log P(continuation | context) and whether the continuation is the greedy one, per request."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: bool = False) -> list[float]:
        """Log-probability of each whole text, scored in disjoint windows of ``max_length`` tokens
        (the first token conditioned on BOS/EOS), as lm-eval's ``loglikelihood_rolling``."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            for ctx, pred in sliding_windows(self.encode(text), self.prefix_token_id, self.max_length):
                pairs.append((ctx, pred))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.loglikelihood_tokens(pairs, progress=progress)):
            totals[i] += logprob
        return totals

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False,
                             desc: str = "scoring") -> list[tuple[float, bool]]:
        """Score (context ids, continuation ids) pairs; see the module docstring for the batching."""
        requests = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"request {i}: empty continuation (nothing to score)")
            if not ctx:
                raise ValueError(f"request {i}: empty context (condition on BOS/EOS: use encode_pair)")
            ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
            if len(ctx) + len(cont) - 1 > self.max_length:
                # As lm-eval: keep the last max_length + 1 tokens (the continuation wins).
                self.truncated += 1
                whole = (ctx + cont)[-(self.max_length + 1):]
                if len(cont) >= len(whole):
                    cont = whole[1:]
                ctx = whole[: len(whole) - len(cont)]
            requests.append(_Request(i, ctx, cont))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        groups: dict[tuple[int, ...], list[_Request]] = {}
        for r in requests:
            groups.setdefault(r.context, []).append(r)
        # Lexicographic order puts contexts that share a prefix (few-shot examples) side by side.
        # A context with more continuations than a batch (the "Answer:" of unconditional scoring)
        # is split: its later parts reuse the prefix cached by the first.
        bs = self.batch_size
        ordered = [(ctx, rs[k:k + bs]) for ctx, rs in sorted(groups.items(), key=lambda kv: kv[0])
                   for k in range(0, len(rs), bs)]
        bar = _progress(len(requests), desc, progress)
        try:
            for chunk in self._chunks(ordered):
                for r, score in zip((r for _, rs in chunk for r in rs), self._score_chunk(chunk)):
                    results[r.index] = score
                bar.update(sum(len(rs) for _, rs in chunk))
        finally:
            bar.close()
            self.model.clear_cache()
            self._prefix = None
        return results

    def _chunks(self, ordered: list[tuple[tuple[int, ...], list[_Request]]]
                ) -> Iterable[list[tuple[tuple[int, ...], list[_Request]]]]:
        """Batches of context groups with at most ``batch_size`` continuations in all,
        closed early where adding a group would shrink the shared prefix enough to cost more than
        256 recomputed tokens (a few-shot prefix of a new subject), or overflow the context."""
        chunk: list[tuple[tuple[int, ...], list[_Request]]] = []
        rows = shared = longest_ctx = longest_cont = 0
        limit = self.model.config.max_seq_len
        for ctx, rs in ordered:
            cont = max(len(r.continuation) for r in rs)
            if chunk:
                new_shared = min(shared, common_prefix_len(chunk[0][0], ctx))
                # Right padding runs every row to the longest context + the longest continuation:
                # the KV cache (and the RoPE table) must hold that.
                span = max(longest_ctx, len(ctx)) - 1 + max(longest_cont, cont)
                if rows + len(rs) > self.batch_size or span > limit or (shared - new_shared) * len(chunk) > 256:
                    yield chunk
                    chunk = []
                else:
                    shared = new_shared
            if not chunk:
                rows, shared, longest_ctx, longest_cont = 0, len(ctx), 0, 0
            chunk.append((ctx, rs))
            rows += len(rs)
            longest_ctx, longest_cont = max(longest_ctx, len(ctx)), max(longest_cont, cont)
        if chunk:
            yield chunk

    @torch.inference_mode()
    def _score_chunk(self, chunk: list[tuple[tuple[int, ...], list[_Request]]]) -> list[tuple[float, bool]]:
        """Scores of the requests of ``chunk`` (in order), from three cached passes."""
        contexts = [ctx for ctx, _ in chunk]
        rows = [(j, r) for j, (_, rs) in enumerate(chunk) for r in rs]
        # Each row's own pass starts at its context's last token, so the shared prefix stops before it.
        shared = min(len(c) for c in contexts) - 1
        for c in contexts[1:]:
            shared = min(shared, common_prefix_len(contexts[0], c))
        n_ctx, n_rows = len(contexts), len(rows)
        tail_len = max(len(c) - 1 - shared for c in contexts)
        cont_len = max(len(r.continuation) for _, r in rows)
        self._ensure_cache(max(n_ctx, n_rows), max(len(c) for c in contexts) - 1 + cont_len)
        device = self.device
        if shared:  # stage 1: the prefix every context shares, once (or reused from the last chunk)
            self._run_prefix(contexts[0][:shared])
            self._copy_cache_rows(torch.zeros(n_ctx, dtype=torch.long), shared)
        if tail_len:  # stage 2: the rest of each context but its last token, once per context
            tokens = torch.zeros(n_ctx, tail_len, dtype=torch.long)
            for j, c in enumerate(contexts):
                tail = c[shared:-1]
                tokens[j, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            pos = shared + torch.arange(tail_len).expand(n_ctx, tail_len)
            self._forward(tokens.to(device), pos.to(device), logits_at=None)
        # stage 3: each continuation from its context's cache row (right-padded, so padding
        # lies after the real tokens and the causal mask hides it from them). Continuations of
        # very different lengths run in several passes of similar lengths, so that short ones
        # are not padded to the longest: the context rows are first parked after the rows a
        # pass uses (the cache has rows to spare when contexts have several continuations).
        filled = shared + tail_len
        passes = length_batches([len(r.continuation) for _, r in rows], max_rows=n_rows - n_ctx,
                                overhead=self.pass_overhead)
        if len(passes) == 1:
            self._copy_cache_rows(torch.tensor([j for j, _ in rows]), filled)
            return self._score_rows(rows, contexts)
        park = max(len(p) for p in passes)
        self._copy_cache_rows(torch.arange(n_ctx), filled, first=park)
        out: list[tuple[float, bool]] = [(0.0, False)] * n_rows
        for batch in passes:
            self._copy_cache_rows(torch.tensor([park + rows[i][0] for i in batch]), filled)
            for i, score in zip(batch, self._score_rows([rows[i] for i in batch], contexts)):
                out[i] = score
        return out

    def _score_rows(self, rows: list[tuple[int, _Request]], contexts: list[tuple[int, ...]]
                    ) -> list[tuple[float, bool]]:
        """Score ``rows`` ((context index, request)) whose context caches fill cache rows 0.. in order."""
        device = self.device
        n_rows = len(rows)
        cont_len = max(len(r.continuation) for _, r in rows)
        tokens = torch.zeros(n_rows, cont_len, dtype=torch.long)
        start = torch.zeros(n_rows, 1, dtype=torch.long)
        targets = []
        for i, (j, r) in enumerate(rows):
            seq = (contexts[j][-1],) + r.continuation[:-1]
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            start[i, 0] = len(contexts[j]) - 1
            targets.append(r.continuation)
        pos = start + torch.arange(cont_len).unsqueeze(0)
        row_idx = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(targets)])
        col_idx = torch.cat([torch.arange(len(t)) for t in targets])
        logits = self._forward(tokens.to(device), pos.to(device), logits_at=(row_idx.to(device), col_idx.to(device)))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        flat_targets = torch.tensor([t for ts in targets for t in ts], device=device)
        picked = logprobs.gather(1, flat_targets.unsqueeze(1)).squeeze(1).double().cpu()
        greedy = (logprobs.argmax(dim=-1) == flat_targets).cpu()
        out, start_i = [], 0
        for t in targets:
            end = start_i + len(t)
            out.append((float(picked[start_i:end].sum()), bool(greedy[start_i:end].all())))
            start_i = end
        return out

    def _ensure_cache(self, rows: int, length: int) -> None:
        """A KV cache of at least ``rows`` x ``length``, kept between chunks when big enough.

        Stale slots are harmless: every slot a query may see (positions up to its own) is written
        in the current chunk before it is read. A cache much longer than needed is replaced, since
        attention reads all of its slots.
        """
        cache = self.model.layers[0].attention.kv_cache
        if cache is not None and cache.k.shape[0] >= rows and length <= self.model.cache_len <= length + 256:
            return
        length = min(-(-length // 64) * 64, self.model.config.max_seq_len)
        self.model.setup_cache(max_batch_size=rows, max_seq_len=length)
        self._prefix = None

    def _run_prefix(self, prefix: tuple[int, ...]) -> None:
        """Fill cache row 0 with the keys and values of ``prefix``, reusing the last chunk's prefix
        as far as it agrees (a few-shot prompt is shared by every question of a task or subject)."""
        done = 0
        if self._prefix is not None:
            saved_tokens, saved = self._prefix
            done = common_prefix_len(saved_tokens, prefix)
            if done:
                for layer, (k, v) in zip(self.model.layers, saved):
                    layer.attention.kv_cache.k[0:1, :, :done] = k[:, :, :done]
                    layer.attention.kv_cache.v[0:1, :, :done] = v[:, :, :done]
        if done < len(prefix):
            self._forward(torch.tensor([prefix[done:]], device=self.device),
                          torch.arange(done, len(prefix), device=self.device), logits_at=None)
        n = len(prefix)
        if self._prefix is None or done < n:
            self._prefix = (prefix, [(layer.attention.kv_cache.k[0:1, :, :n].clone(),
                                      layer.attention.kv_cache.v[0:1, :, :n].clone()) for layer in self.model.layers])

    def _forward(self, tokens: Tensor, input_pos: Tensor, logits_at: tuple[Tensor, Tensor] | None) -> Tensor | None:
        """Run ``tokens`` into the KV cache; return the logits at (rows, columns) ``logits_at``."""
        trunk = self._runner if self._runner is not None else self.model
        hidden = trunk.hidden_states(tokens, input_pos=input_pos)
        if logits_at is None:
            return None
        # The output head only where a score is needed: it is vocab x dim per position, and
        # contexts, padding and few-shot prefixes need none.
        return trunk.output(hidden[logits_at]).float()

    def _copy_cache_rows(self, source_rows: Tensor, filled: int, first: int = 0) -> None:
        """Make cache row ``first + i`` a copy of cache row ``source_rows[i]`` (its first ``filled``
        slots), in every layer."""
        src = source_rows.to(self.device)
        if not filled or torch.equal(src, torch.arange(first, first + len(src), device=src.device)):
            return
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            # (indexing with a tensor reads a copy first, so source and target rows may overlap)
            cache.k[first: first + len(src), :, :filled] = cache.k[src, :, :filled]
            cache.v[first: first + len(src), :, :filled] = cache.v[src, :, :filled]

    # ---------------------------------------------------------------- generation

    def generate_until(self, prompts: Sequence[str], *, until: Sequence[str] = (), max_new_tokens: int = 256,
                       progress: bool = False) -> list[str]:
        """Greedy continuation of each prompt, cut before the first stop string in ``until`` (or a stop token).

        Prompts too long for ``max_length - max_new_tokens`` keep their last tokens (counted in
        ``truncated``). Prompts are batched by length, ``batch_size`` at a time.
        """
        from llamalab.generate import GenerationConfig, Generator

        if max_new_tokens < 1 or max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected 1..{self.max_length - 1}")
        if self._generator is None:
            self._generator = Generator(self.model, self.tokenizer)
        config = GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=tuple(s for s in until if s))
        room = self.max_length - max_new_tokens
        encoded = []
        for p in prompts:
            ids = self.encode(p) or [self.prefix_token_id]
            if len(ids) > room:
                self.truncated += 1
                ids = ids[-room:]
            encoded.append(ids)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out = [""] * len(encoded)
        bar = _progress(len(encoded), "generating", progress)
        try:
            for k in range(0, len(order), self.batch_size):
                batch = order[k:k + self.batch_size]
                for i, result in zip(batch, self._generator.generate([encoded[i] for i in batch], config)):
                    out[i] = result.text
                bar.update(len(batch))
        finally:
            bar.close()
        return out


def length_batches(lengths: Sequence[int], max_rows: int, overhead: int = 32) -> list[list[int]]:
    """Indices of ``lengths`` split into batches of similar length, to pad less.

    Minimises the padded size (rows x longest, summed over batches) plus ``overhead`` tokens per
    extra batch, with at most ``max_rows`` rows in any batch of a split; one batch of everything
    when that is cheapest or ``max_rows`` is too small to split.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    whole = n * max(lengths, default=0)
    if max_rows < 1 or n < 2:
        return [list(range(n))]
    # best[e]: cheapest split of the e shortest; batches are runs of the sorted order.
    best = [0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for e in range(1, n + 1):
        for b in range(max(0, e - max_rows), e):
            cost = best[b] + (e - b) * lengths[order[e - 1]] + overhead
            if cost < best[e]:
                best[e], cut[e] = cost, b
    if best[n] - overhead >= whole:  # the split does not pay for its extra passes
        return [list(range(n))]
    batches, e = [], n
    while e:
        batches.append(order[cut[e]:e])
        e = cut[e]
    return batches[::-1]


def sliding_windows(tokens: Sequence[int], prefix_token: int, window: int, stride: int | None = None, *,
                    reuse_prefix: bool = False) -> list[tuple[list[int], list[int]]]:
    """(context, predicted) pairs covering every token of ``tokens`` once; the model input of each
    (context + predicted[:-1]) is at most ``window`` tokens.

    The first pair predicts up to ``window`` tokens from ``prefix_token``; each later one the next
    ``stride`` tokens (default: ``window``), after the ``window - stride`` tokens before them.
    With ``stride == window`` these are lm-eval's disjoint rolling windows (``context_len=1``).
    ``reuse_prefix``: when ``tokens`` already starts with ``prefix_token`` (a BOS), condition on
    that one instead of prepending another (lm-eval prepends regardless).
    """
    stride = stride or window
    if window < 2:
        raise ValueError(f"window={window}: expected at least 2 tokens")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride}: expected 1..window ({window})")
    seq = list(tokens)
    if not (reuse_prefix and seq and seq[0] == prefix_token):
        seq = [prefix_token] + seq
    pairs = []
    pos = 1
    while pos < len(seq):
        n = min(window if pos == 1 else stride, len(seq) - pos)
        pairs.append((seq[max(0, pos - (window - n + 1)):pos], seq[pos:pos + n]))
        pos += n
    return pairs


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar with an ETA on stderr, or a do-nothing bar."""
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="req", dynamic_ncols=True, mininterval=1.0)

