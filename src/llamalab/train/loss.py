"""The language-model loss: the output head and cross-entropy fused, a chunk of tokens at a time.

``F.cross_entropy(model(x), y)`` materialises the (tokens, vocab) logits in fp32, then
``log_softmax`` and, in backward, ``log_softmax_backward`` and the head's two products over
that whole matrix. With a 32K-128K vocabulary this is the largest tensor of a training step
(2048 tokens x 32000 = 262 MB in fp32) and on a CPU its element-wise passes cost as much as
the body's matrix products (measured: ``log_softmax_backward`` alone is a quarter of a bf16
step of the 15M model).

:class:`LinearCrossEntropy` computes, per chunk of tokens, the logits, their log-sum-exp,
the loss and at once the gradient of the loss with respect to the logits
(``softmax - one_hot``, divided by the number of counted tokens), which it immediately turns
into the gradients of the hidden states and of the head's weight. Only those two gradients
are kept for backward (the loss is the end of the graph, so its gradient is a scalar that
just scales them). Tokens whose target is not counted (a prompt under SFT's loss mask, padding)
are dropped before the head: their logits are never computed. No full logits tensor ever exists and nothing is recomputed: the FLOPs are
those of the unfused head. The result equals ``F.cross_entropy(h @ W.T, y)`` (mean over the
targets that are not ``ignore_index``) up to floating-point rounding: tested against it.

The model stays unaware of this: the loop calls ``model.hidden_states`` and passes
``model.output.weight``. Under bf16 autocast the products run in bf16 (as the unfused head's
would) and the log-sum-exp and probabilities in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MatmulT = Callable[[Tensor, Tensor], Tensor]  # (a, b) -> a @ b.T

# Elements of one chunk's logits. With a weight gradient, each chunk's gradient product adds into
# the whole (vocab, dim) fp32 weight gradient, one pass over it a chunk, so chunks are large
# (32M: 128 MB of fp32 logits). A frozen head (LoRA) has no such pass, and smaller chunks keep a
# step's transients (a chunk's products, fp32 logits and gradient, ~12 bytes an element at bf16)
# a small share of its memory and run faster in cache. Measured on 2 cores (AMD EPYC Zen 4, bf16,
# forward + backward): a frozen 49K head over 2048 tokens takes 0.80x the time in 170-token chunks
# (8M) as in 682-token ones (32M); a trained one 1.14x, and a trained 128K head of dim 2048 over
# 1024 tokens 1.74x in 65-token chunks as in 261-token ones.
CHUNK_ELEMENTS = 32 * 1024 * 1024
FROZEN_CHUNK_ELEMENTS = 8 * 1024 * 1024


def _chunk_tokens(weight: Tensor, vocab: int, chunk_tokens: int | None) -> int:
    """Tokens a chunk: ``chunk_tokens`` if given, else by whether the head is trained (see above)."""
    if chunk_tokens:
        return chunk_tokens
    return max(1, (CHUNK_ELEMENTS if weight.requires_grad else FROZEN_CHUNK_ELEMENTS) // vocab)


class LinearCrossEntropy(torch.autograd.Function):
    """``mean cross_entropy(hidden @ weight.T, targets)`` without materialising the logits (see the module doc)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor,  # noqa: ANN001 - autograd's ctx
                ignore_index: int = -100, chunk_tokens: int | None = None, mm_t: MatmulT | None = None) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        device_type, dtype = _compute_dtype(hidden)
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            if mm_t is None:
                mm_t = _mm_t
            w_t = w.t().contiguous() if mm_t is not _mm_t else w.t()
            acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
            valid = targets != ignore_index
            count = valid.sum().clamp(min=1)
            chunk = _chunk_tokens(weight, vocab, chunk_tokens)
            grad_h = torch.empty_like(h)
            # A frozen head (LoRA on a tied or untouched head) needs no weight gradient: a third of
            # the head's FLOPs and a (vocab, dim) fp32 buffer saved.
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
            total = torch.zeros((), dtype=acc, device=hidden.device)
            for start in range(0, n, chunk):
                h_c, y_c, v_c = h[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
                logits = mm_t(h_c, w).to(acc)
                y_safe = torch.where(v_c, y_c, 0).unsqueeze(1)
                # Log-sum-exp by hand, in place (torch.logsumexp allocates several full-size temporaries).
                logits.sub_(logits.amax(dim=1, keepdim=True))
                target = logits.gather(1, y_safe).squeeze(1)
                probs = logits.exp_()
                sums = probs.sum(dim=1)
                total += ((sums.log() - target) * v_c).sum()
                # d loss / d logits = (softmax - one_hot) / count on counted rows, 0 elsewhere.
                weight_c = v_c.to(acc) / count
                probs.mul_((weight_c / sums).unsqueeze(1))
                probs.scatter_add_(1, y_safe, -weight_c.unsqueeze(1))
                g = probs.to(dtype)
                grad_h[start:start + chunk] = mm_t(g, w_t)
                # grad_w accumulates over chunks (in fp32 at least, whatever the products run in).
                if grad_w is not None:
                    grad_w += mm_t(g.t(), h_c.t())
                del logits, probs, g  # before the next chunk's, not after: one chunk alive at a time
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.mul(grad_loss).to(h_dtype) if ctx.needs_input_grad[0] else None,
                grad_w.mul(grad_loss).to(w_dtype) if ctx.needs_input_grad[1] and grad_w is not None else None,
                None, None, None, None)


def _compute_dtype(hidden: Tensor) -> tuple[str, torch.dtype]:
    """The device type and the dtype the products run in: autocast's where it is on."""
    device_type = hidden.device.type
    return device_type, (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    return a @ b.t()


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         chunk_tokens: int | None = None, mm_t: MatmulT | None = None) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (tokens whose target is
    ``ignore_index`` are not counted), computed chunk by chunk without the full logits.

    ``hidden`` is (..., dim) and ``targets`` the matching (...) integer tensor; ``weight`` is the
    output head's (vocab, dim) matrix. ``mm_t(a, b) = a @ b.T`` computes the three products (e.g.
    ``train.speed.onednn_mm_t`` for fp32 in oneDNN); the default is torch's.
    """
    hidden, targets, _ = _counted_rows(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), ignore_index)
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_tokens, mm_t)


def _counted_rows(hidden: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The (N, dim) ``hidden`` rows whose target counts, their targets, and where they were (None:
    every row counts). The head is the largest product of a small model's step: a prompt's or a
    padding slot's logits are not computed at all (SFT on the answers, DPO on the responses)."""
    counted = targets != ignore_index
    if bool(counted.all()):
        return hidden, targets, None
    where = counted.nonzero().squeeze(1)
    return hidden.index_select(0, where), targets.index_select(0, where), where


class LinearTokenLogProbs(torch.autograd.Function):
    """Per-token ``log softmax(hidden @ weight.T)[target]`` without materialising the logits.

    For losses that need each sequence's summed log-probability (DPO, reward-weighted
    objectives): their gradient per token is only known once every sequence's sum is, so unlike
    :class:`LinearCrossEntropy` the gradient cannot be formed in forward. Forward keeps the
    log-sum-exp of each token (one float a token); backward recomputes each chunk's logits once
    (one more head product than the unfused head, no (tokens, vocab) tensor at any time).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor,  # noqa: ANN001 - autograd's ctx
                ignore_index: int = -100, chunk_tokens: int | None = None, mm_t: MatmulT | None = None) -> Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        device_type, dtype = _compute_dtype(hidden)
        mm_t = mm_t or _mm_t
        chunk = _chunk_tokens(weight, vocab, chunk_tokens)
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            out = torch.zeros(n, dtype=acc, device=hidden.device)
            lse = torch.zeros(n, dtype=acc, device=hidden.device)
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                logits = mm_t(h[sl], w).to(acc)
                # Log-sum-exp in place (torch.logsumexp allocates full-size temporaries).
                top = logits.amax(dim=1, keepdim=True)
                target = logits.gather(1, safe[sl].unsqueeze(1)).squeeze(1)
                lse[sl] = logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
                out[sl] = (target - lse[sl]) * valid[sl]
                del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.settings = (dtype, chunk, mm_t)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        dtype, chunk, mm_t = ctx.settings
        acc = lse.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            w_t = w.t().contiguous() if mm_t is _mm_t else w.t()
            g_tok = grad_out.to(acc) * valid
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
            for start in range(0, h.shape[0], chunk):
                sl = slice(start, start + chunk)
                # d logp[target] / d logits = one_hot - softmax, times the token's upstream gradient.
                probs = mm_t(h[sl], w).to(acc).sub_(lse[sl].unsqueeze(1)).exp_()
                g = g_tok[sl].unsqueeze(1)
                probs.mul_(-g).scatter_add_(1, safe[sl].unsqueeze(1), g)
                gl = probs.to(dtype)
                if grad_h is not None:
                    grad_h[sl] = mm_t(gl, w_t)
                if grad_w is not None:
                    grad_w += mm_t(gl.t(), h[sl].t())
                del probs, gl
        return (grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                          chunk_tokens: int | None = None, mm_t: MatmulT | None = None) -> Tensor:
    """``log_softmax(hidden @ weight.T)`` at each target, shaped like ``targets`` (0 where the
    target is ``ignore_index``), computed chunk by chunk without the full logits; differentiable
    in ``hidden`` and ``weight`` (see :class:`LinearTokenLogProbs`)."""
    h, t, where = _counted_rows(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), ignore_index)
    out = LinearTokenLogProbs.apply(h, weight, t, ignore_index, chunk_tokens, mm_t)
    if where is not None:  # 0 at the targets not counted
        out = out.new_zeros(targets.numel()).index_copy(0, where, out)
    return out.view(targets.shape)


__all__ = ["CHUNK_ELEMENTS", "FROZEN_CHUNK_ELEMENTS", "LinearCrossEntropy", "LinearTokenLogProbs", "linear_cross_entropy",
           "linear_token_logprobs"]
