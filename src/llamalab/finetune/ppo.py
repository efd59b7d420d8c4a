"""PPO as Llama 2-Chat used it (§3.2.3): the reward it maximises and the clipped objective.

The reward of a generation g for a prompt p (Llama 2, eq. 3-4)::

    R_c(g|p) = R_s(g|p)  if the prompt is tagged safety or R_s(g|p) < 0.15, else R_h(g|p)
    R̃_c(g|p) = WHITEN(LOGIT(R_c(g|p)))
    R(g|p)   = R̃_c(g|p) - β · KL(π_θ(g|p) ‖ π_0(g|p))

R_s and R_h are the safety and helpfulness reward models' scores as probabilities (the sigmoid
of their scalar outputs; LOGIT reverses it, so R̃_c is a whitened raw score). The KL term is
taken per token, as torchtune and TRL do: each response token gets −β(log π_θ − log π_0) and
the last one also gets the whole score. Advantages come from generalised advantage estimation
(Schulman et al. 2016) over the response tokens, and the loss is PPO's clipped surrogate plus a
clipped value loss (Schulman et al. 2017), in torchtune's and TRL's formulation (tested against
torchtune's functions on the same tensors).

Tensors are (B, T) over response tokens with a bool ``mask`` (True = a real response token);
responses are right-padded.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SAFETY_THRESHOLD", "apply_no_eos_penalty", "entropy_from_logits", "gae", "gated_reward",
           "kl_penalized_rewards", "masked_mean", "masked_var", "ppo_loss", "shaped_reward", "whiten"]

SAFETY_THRESHOLD = 0.15  # Llama 2: the safety score below which the safety model decides


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (all entries without one)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor | None = None, *, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the True entries of ``mask`` (Bessel-corrected when ``unbiased``)."""
    if mask is None:
        return x.var(unbiased=unbiased)
    m = mask.to(x.dtype)
    n = m.sum()
    var = (((x - masked_mean(x, mask)) ** 2) * m).sum() / n.clamp_min(1.0)
    return var * n / (n - 1).clamp_min(1.0) if unbiased else var


def whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries; with ``shift_mean`` the mean is added back (only
    the scale is normalised), as TRL and torchtune whiten advantages. Llama 2's WHITEN of the
    reward is ``shift_mean=False``: zero mean, unit variance."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return out + mean if shift_mean else out


def gated_reward(helpful: Tensor, safety: Tensor, is_safety: Tensor,
                 threshold: float = SAFETY_THRESHOLD) -> Tensor:
    """R_c of Llama 2 (eq. 3) as a probability: σ(safety score) where the prompt is tagged safety or
    σ(safety score) < ``threshold``, else σ(helpfulness score). Inputs are the raw scalar scores, (B,)."""
    p_help, p_safe = torch.sigmoid(helpful.float()), torch.sigmoid(safety.float())
    return torch.where(is_safety.bool() | (p_safe < threshold), p_safe, p_help)


def shaped_reward(helpful: Tensor, safety: Tensor, is_safety: Tensor, *, threshold: float = SAFETY_THRESHOLD,
                  eps: float = 1e-6) -> Tensor:
    """R̃_c = WHITEN(LOGIT(R_c)) over the batch (Llama 2 eq. 4; "whiten the final linear scores
    (shown here by reversing the sigmoid with the logit function) in order to increase
    stability"). ``eps`` bounds the logit at ±log((1 − eps) / eps)."""
    return whiten(torch.logit(gated_reward(helpful, safety, is_safety, threshold), eps=eps), shift_mean=False)


def apply_no_eos_penalty(scores: Tensor, ended: Tensor, penalty: float = -3.0) -> Tensor:
    """Replace the score of each response that never ended (hit the token limit) by ``penalty``
    (torchtune's ``reward_penalty``, -3 by default)."""
    return torch.where(ended.bool(), scores, torch.full_like(scores, penalty))


def kl_penalized_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         beta: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T): −β(log π_θ − log π_0) at every response token, plus the sequence's
    score at its last token; and the per-token KL estimate log π_θ − log π_0 (0 on padding)."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -beta * kl
    last = (mask.long().sum(-1) - 1).clamp_min(0)
    rewards = rewards.scatter_add(1, last.unsqueeze(-1), scores.to(rewards.dtype).unsqueeze(-1))
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        whiten_advantages: bool = True) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), both (B, T).

    δ_t = r_t + γ V_{t+1} − V_t (V after the last token = 0), A_t = δ_t + γλ A_{t+1};
    returns = A + V (before whitening). Padding contributes nothing; the advantages are whitened
    over the real tokens (mean kept, as TRL and torchtune do) and 0 on padding.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    steps = values.shape[1]
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_v = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    returns = adv + values
    if whiten_advantages:
        adv = whiten(adv, mask) * m
    return adv, returns


def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, mask: Tensor, *, clip: float = 0.2, value_clip: float = 0.2,
             value_coef: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate plus the clipped value loss, means over the response tokens.

    policy = mean(max(−A·ρ, −A·clip(ρ, 1 ± clip))), ρ = exp(log π − log π_old);
    value = ½ mean(max((V − R)², (clip(V, V_old ± value_clip) − R)²));
    loss = policy + value_coef · value. Returns the loss and detached figures: ``policy_loss``,
    ``value_loss``, ``clip_fraction`` (tokens where the clipped term is the larger), ``ratio`` (mean)
    and ``approx_kl`` (mean of (ρ − 1) − log ρ, old to new).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    policy = masked_mean(torch.maximum(unclipped, clipped), mask)
    v_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    value = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    loss = policy + value_coef * value
    with torch.no_grad():
        stats = {"policy_loss": policy.detach(), "value_loss": value.detach(),
                 "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                 "ratio": masked_mean(ratio, mask), "approx_kl": masked_mean((ratio - 1) - log_ratio, mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy (nats) of the next-token distributions at the masked positions; (B, T, V) logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return masked_mean(ent, mask)
