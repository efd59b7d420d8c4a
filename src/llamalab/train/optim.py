"""The LLaMA optimisation recipe: AdamW with decoupled weight decay, warmup + cosine, clipping.

LLaMA (Touvron et al. 2023a, §2.2): AdamW, β1 = 0.9, β2 = 0.95, weight decay 0.1, gradient
clipping 1.0, 2,000 warmup steps, cosine decay to 10% of the peak learning rate. Llama 2
keeps it (and states eps = 1e-5). Llama 3 (Dubey et al. 2024, §3.4.1/3.4.3) warms up
linearly, decays with a cosine and, over the last tokens of pre-training, anneals the
learning rate linearly to 0 (``schedule="linear-anneal"`` here).

Which parameters decay: every parameter with two or more dimensions -- the attention and
feed-forward weight matrices, the output head **and the token embeddings** -- as most
reproductions do (nanoGPT, torchtitan, OpenLLaMA); one-dimensional parameters (the RMSNorm
gains) never decay. ``decay_embeddings=False`` exempts the input embedding table (OLMo 2's
choice); with tied embeddings the shared matrix then does not decay either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SCHEDULES", "build_optimizer", "build_scheduler", "clip_grad_norm", "lr_at", "lr_lambda",
           "param_groups"]

SCHEDULES = ("cosine", "linear-anneal")


def param_groups(model: nn.Module, weight_decay: float, *,
                 decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """Two AdamW groups: ``[{decayed 2-D weights}, {1-D params with weight_decay 0}]``.

    Each group carries ``param_names`` (the model's names, a tied matrix listed once under its
    first name) so optimizer state dicts can be read by a person. Frozen parameters
    (``requires_grad=False``) are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():  # shared (tied) parameters come once
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or (not decay_embeddings and id(p) in embeddings)
        (no_decay if exempt else decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    weight_decay: float = 0.1, eps: float = 1e-5, fused: bool | None = None,
                    *, decay_embeddings: bool = True) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``fused=None`` lets torch pick its implementation
    (``foreach`` on CUDA); ``fused=True`` asks for the single-kernel version (CUDA, and CPU
    since torch 2.4)."""
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_embeddings=decay_embeddings), **kwargs)


def clip_grad_norm(parameters: Iterable[Tensor] | nn.Module, max_norm: float | None) -> Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (torch's ``clip_grad_norm_``);
    returns the norm *before* clipping. ``max_norm`` None or <= 0 only measures it.

    The returned norm may be non-finite: the caller decides whether to skip the step.
    """
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    limit = float("inf") if max_norm is None or max_norm <= 0 else float(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, limit)


def _check(warmup_steps: int, total_steps: int, min_lr_ratio: float, schedule: str,
           anneal_steps: int | None) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps (got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio}: expected a value in [0, 1]")
    if schedule == "linear-anneal":
        if anneal_steps is None or not 0 < anneal_steps <= total_steps - warmup_steps:
            raise ValueError(f"schedule 'linear-anneal' needs 0 < anneal_steps <= total_steps - warmup_steps "
                             f"(got anneal_steps={anneal_steps}, {total_steps - warmup_steps} steps after warmup)")


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1,
          schedule: str = "cosine", anneal_steps: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    - warmup, ``step < warmup_steps``: ``peak * (step + 1) / warmup_steps`` (the first update
      already moves; the last warmup step is at the peak);
    - ``"cosine"`` (LLaMA), ``warmup_steps <= step <= total_steps``:
      ``min + (peak - min) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (total - warmup)``
      and ``min = min_lr_ratio * peak``; after ``total_steps``: ``min``;
    - ``"linear-anneal"`` (Llama 3): the same cosine, reaching ``min`` at
      ``total_steps - anneal_steps``, then a straight line from ``min`` to 0 at ``total_steps``;
      after ``total_steps``: 0.
    """
    _check(warmup_steps, total_steps, min_lr_ratio, schedule, anneal_steps)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    decay_end = total_steps if schedule == "cosine" else total_steps - anneal_steps  # type: ignore[operator]
    if step <= decay_end:
        t = (step - warmup_steps) / max(decay_end - warmup_steps, 1)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "cosine":
        return min_lr
    if step >= total_steps:
        return 0.0
    return min_lr * (total_steps - step) / anneal_steps  # type: ignore[operator]


def lr_lambda(*, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1, schedule: str = "cosine",
              anneal_steps: int | None = None) -> Callable[[int], float]:
    """``step -> lr / peak_lr`` for ``torch.optim.lr_scheduler.LambdaLR`` (checked once, here).

    A plain function, so ``LambdaLR.state_dict()`` does not store it: on resume the schedule
    comes from the run's config and only the step counter from the checkpoint.
    """
    _check(warmup_steps, total_steps, min_lr_ratio, schedule, anneal_steps)
    kw = dict(peak_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio,
              schedule=schedule, anneal_steps=anneal_steps)

    def multiplier(step: int) -> float:
        return lr_at(step, **kw)  # type: ignore[arg-type]

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.1, schedule: str = "cosine",
                    anneal_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_lambda`: after ``s`` calls of ``scheduler.step()`` every group's
    lr is ``lr_at(s, peak_lr=<the group's initial lr>, ...)``."""
    fn = lr_lambda(warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio,
                   schedule=schedule, anneal_steps=anneal_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
