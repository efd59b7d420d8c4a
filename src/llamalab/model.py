"""The LLaMA decoder-only transformer, as the papers describe it.

Pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary position embeddings
(with Llama 3.1's frequency scaling) applied to queries and keys, grouped-query
attention through ``scaled_dot_product_attention``, a preallocated KV cache for
incremental decoding, and an optional document mask for packed sequences.

Weight names are Meta's (``tok_embeddings``, ``layers.N.attention.wq`` ...) and the
rotary embedding pairs adjacent features ``(x[2i], x[2i+1])`` as Meta's code does;
checkpoint converters translate other layouts at the border. This file knows
nothing of training, parallelism or quantization: those wrap the model from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension; computed in fp32 for stability under bf16."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """Rotation frequency of each feature pair, ``theta^(-2i/d)``, with optional Llama 3.1 scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return freqs.float()
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones kept; the band
    # in between is a linear blend in 1/wavelength.
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, blended)
    scaled = torch.where(wavelen < high_wavelen, freqs, scaled)
    return scaled.float()


def precompute_rope(head_dim: int, end: int, theta: float, scaling: RopeScaling | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Cosines and sines for positions ``0..end-1``: shape ``(end, head_dim // 2, 2)``, fp32."""
    freqs = rope_frequencies(head_dim, theta, scaling).to(device)
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of ``x`` (B, S, H, D) by ``rope`` (B or 1, S, D/2, 2)."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written at given positions."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, start: int, n: int) -> KVCache:
        """A cache over rows ``start .. start + n - 1`` of this one, sharing its memory: what is written
        through it is written here (a batch's newcomers prefill into their own rows this way)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:start + n], persistent=False)
        view.register_buffer("v", self.v[start:start + n], persistent=False)
        return view

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` (B, H_kv, S, D) at ``input_pos`` ((S,) or (B, S)); return the batch's cache."""
        bsz = k.shape[0]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # (a cache in another precision: rounded here)
        if input_pos.dim() == 1:
            self.k[:bsz, :, input_pos] = k
            self.v[:bsz, :, input_pos] = v
        else:
            rows = torch.arange(bsz, device=k.device).unsqueeze(1)
            # Advanced indices around a slice put the indexed dims first: (B, S, H_kv, D).
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k[:bsz], self.v[:bsz]


class DocumentMask:
    """Llama 3's document mask for packed sequences, as runs of positions rather than an S x S
    tensor: each row's documents are attended to one at a time, causally, with the same kernel
    as an unmasked sequence (a "varlen" attention), so the mask costs O(S) memory instead of
    O(S^2) and the attention O(sum of squared document lengths) instead of O(S^2).

    ``segments[b]`` lists row b's ``(start, end)`` runs of one document id, covering 0..S.
    """

    def __init__(self, segments: list[list[tuple[int, int]]], seqlen: int) -> None:
        self.segments, self.seqlen = segments, seqlen

    @classmethod
    def from_doc_ids(cls, doc_ids: Tensor) -> "DocumentMask | None":
        """The runs of ``doc_ids`` (B, S); None if some document's tokens are not contiguous in its
        row (only a dense mask expresses that)."""
        rows = doc_ids.tolist()
        segments = []
        for row in rows:
            runs, start, seen = [], 0, set()
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    if row[start] in seen:
                        return None
                    seen.add(row[start])
                    runs.append((start, i))
                    start = i
            segments.append(runs)
        return cls(segments, doc_ids.shape[1])

    def dense(self, device: torch.device | str | None = None) -> Tensor:
        """The same mask as a boolean (B, 1, S, S) tensor (True: may attend)."""
        mask = torch.zeros(len(self.segments), 1, self.seqlen, self.seqlen, dtype=torch.bool, device=device)
        for b, runs in enumerate(self.segments):
            for start, end in runs:
                mask[b, 0, start:end, start:end] = True
        return mask.tril_()

    def apply(self, attend: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
              q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``attend`` (causal when given no mask) run on each document, the outputs joined."""
        rows = []
        for b, runs in enumerate(self.segments):
            if len(runs) == 1:
                rows.append(attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], None))
                continue
            rows.append(torch.cat([attend(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], None)
                                   for s, e in runs], dim=2))
        return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads and rotary embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """Attend over the sequence (or the KV cache when one is set up).

        ``mask`` is a boolean (B or 1, 1, S, T) tensor where True means "may attend", or a
        :class:`DocumentMask`; ``None`` means plain causal attention over ``x`` itself.
        """
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if k.dtype != q.dtype:  # a cache in another precision (kv_cache_dtype)
                k, v = k.to(q.dtype), v.to(q.dtype)
        out = mask.apply(self.attend, q, k, v) if isinstance(mask, DocumentMask) else self.attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``softmax(q k^T / sqrt(d)) v`` per head, (B, H, S, D) queries over (B, H_kv, T, D) keys and
        values: causal when ``mask`` is None. One fused kernel (SDPA: flash / memory-efficient)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Gated feed-forward."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """One block."""
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def _segments_pay(mask: DocumentMask) -> bool:
    """Whether per-document attention beats one masked call: documents of at least
    ``_MIN_SEGMENT`` tokens on average (measured crossover, docs/training.md)."""
    n = sum(len(runs) for runs in mask.segments)
    return mask.seqlen * len(mask.segments) >= _MIN_SEGMENT * n


_MIN_SEGMENT = 8


class Transformer(nn.Module):
    """The LLaMA model: token embeddings, ``n_layers`` blocks, a final norm and the output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", self._rope(self.tok_embeddings.weight.device), persistent=False)
        self.cache_len = 0
        # The KV cache's dtype (None: the weights'). An inference setting: a 16-bit cache halves the
        # bytes a decode step reads per cached position (llama.cpp keeps f16 keys and values).
        self.kv_cache_dtype: torch.dtype | None = None
        # How doc_ids become a mask: "segments" (DocumentMask: per-document attention, no S x S
        # tensor), "dense" (one boolean S x S mask per row) or "auto" (segments unless the rows
        # hold so many short documents that a kernel call per document costs more).
        self.document_attention = "auto"

    def _rope(self, device: torch.device) -> Tensor:
        c = self.config
        if device.type == "meta":  # shape only: the arithmetic on meta tensors imports torch's refs (seconds)
            return torch.empty(c.max_seq_len, c.head_dim // 2, 2, device=device)
        return precompute_rope(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling, device=device)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the RoPE table, e.g. after building on the meta device and loading weights."""
        device = device if device is not None else self.tok_embeddings.weight.device
        self.rope = self._rope(torch.device(device))

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) linear and embedding weights, unit norms (used for fresh models)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache in every layer; decoding then passes ``input_pos``.

        ``dtype``: the cache's (default :attr:`kv_cache_dtype`, else the weights' dtype); keys and
        values are rounded to it when stored and read back in the activations' dtype."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds max_seq_len={self.config.max_seq_len}")
        w = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, self.config.n_kv_heads,
                                               self.config.head_dim, dtype or self.kv_cache_dtype or w.dtype,
                                               w.device)
        self.cache_len = max_seq_len

    def clear_cache(self) -> None:
        """Drop the KV caches (back to full-sequence mode)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_len = 0

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None,
                doc_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Logits (B, S, vocab) in fp32 for ``tokens`` (B, S).

        ``input_pos`` ((S,) or (B, S)) gives each token's position; it is required once a
        KV cache is set up, and defaults to ``0..S-1`` otherwise. ``doc_ids`` (B, S) marks
        which packed document each token belongs to: tokens attend only within their own
        document (Llama 3's document mask). ``mask``, for a full-sequence pass instead of both:
        any boolean (B or 1, 1, S, S) "may attend" pattern (e.g. two responses sharing one
        prompt's tokens, ``finetune/data.py: share_prompts``); no query row may be all False.
        """
        return self.output(self.hidden_states(tokens, input_pos, doc_ids, mask)).float()

    def hidden_states(self, tokens: Tensor, input_pos: Tensor | None = None,
                      doc_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Final-normed hidden states (B, S, dim): the trunk shared with reward and value heads."""
        bsz, seqlen = tokens.shape
        if self.cache_len and input_pos is None:
            raise ValueError("a KV cache is set up: pass input_pos")
        positions = input_pos if input_pos is not None else torch.arange(seqlen, device=tokens.device)
        rope = self.rope[positions]
        rope = rope.unsqueeze(0) if rope.dim() == 3 else rope
        if mask is None:
            mask = self._mask(positions, doc_ids, seqlen)
        else:
            self._check_mask(mask, doc_ids, bsz, seqlen)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos)
        return self.norm(h)

    def _check_mask(self, mask: Tensor, doc_ids: Tensor | None, bsz: int, seqlen: int) -> None:
        """A caller's own attention mask: boolean, (B or 1, 1, S, S), for a full-sequence pass."""
        if self.cache_len:
            raise ValueError("mask= is for full-sequence forward passes, not the KV cache")
        if doc_ids is not None:
            raise ValueError("pass doc_ids or mask, not both (the mask already says what each token sees)")
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, bsz) or mask.shape[1] != 1
                or tuple(mask.shape[2:]) != (seqlen, seqlen)):
            raise ValueError(f"mask: expected a boolean ({bsz} or 1, 1, {seqlen}, {seqlen}) tensor, got "
                             f"{mask.dtype} {tuple(mask.shape)}")

    def _mask(self, positions: Tensor, doc_ids: Tensor | None, seqlen: int) -> Tensor | None:
        """The boolean attention mask, or None when SDPA's built-in causal mask suffices."""
        if not self.cache_len:
            if doc_ids is None:
                return None
            how = self.document_attention
            if how not in ("auto", "segments", "dense"):
                raise ValueError(f"document_attention={how!r}: expected 'auto', 'segments' or 'dense'")
            segments = DocumentMask.from_doc_ids(doc_ids) if how != "dense" else None
            if segments is not None and (how == "segments" or _segments_pay(segments)):
                return segments
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=positions.device).tril()
            same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
            return (causal & same_doc).unsqueeze(1)
        if doc_ids is not None:
            raise ValueError("doc_ids (document masking) is for full-sequence forward passes, not the KV cache")
        # Query at position p may see cache slots 0..p.
        slots = torch.arange(self.cache_len, device=positions.device)
        mask = slots <= positions.unsqueeze(-1)  # (S, T) or (B, S, T)
        return mask.unsqueeze(0).unsqueeze(0) if mask.dim() == 2 else mask.unsqueeze(1)
