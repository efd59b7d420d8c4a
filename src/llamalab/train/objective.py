"""What a training run optimises, as one object the loop (``train/loop.py``) drives.

The loop owns everything every method shares: the optimizer and schedule, precision and
autocast, gradient accumulation, clipping and the skip of non-finite steps, metrics and the
progress bar, atomic checkpoints with resume and SIGTERM, the periodic evaluation call and the
summary. An :class:`Objective` owns what differs: its data (checked before any compute), how
the model is built (from scratch, from a checkpoint, with adapters), the micro-batches of a step
with each one's share of the step's loss, the loss itself and its figures, held-out evaluation,
what a checkpoint holds and what the run exports. Pretraining
(:class:`llamalab.train.loop.PretrainObjective`), SFT and DPO (``llamalab.finetune``) are
objectives; a new method is one more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Objective", "StepBatches"]


@dataclass
class StepBatches:
    """One optimizer step's micro-batches: ``items`` = [(batch, weight)], where ``weight`` is the
    share of the step's loss that micro-batch carries (the weights sum to 1: the loop backpropagates
    ``loss * weight``); ``tokens`` = the tokens the step counts (all processes), for ``tokens_seen``
    and throughput; ``seq_len`` = the length the FLOPs-per-token figure uses."""

    items: list[tuple[Any, float]]
    tokens: int
    seq_len: int


class Objective(ABC):
    """The method-specific half of a training run (see the module doc).

    Call order: ``build_model`` -> (the loop restores a checkpoint through
    ``load_weights`` / ``load_data_state``) -> ``start`` -> per step ``step_batches`` and
    ``loss`` per micro-batch (under autocast) -> ``evaluate`` every ``eval.every`` steps ->
    ``export`` at the end.
    """

    name: str = "train"  # the run's label in log lines and the summary

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Optimizer steps in the whole run (the schedule's length)."""

    def describe(self) -> list[str]:
        """Lines said once at start (data summary, packing efficiency, ...)."""
        return []

    @abstractmethod
    def build_model(self, device: torch.device, precision: str, mesh: Any) -> nn.Module:
        """The model to train, on ``device``, with its trainable parameters requiring gradients."""

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Callable[[], Any]) -> None:
        """Build the data iterators (resumed from ``load_data_state`` if it was called); ``autocast()``
        is the context the loop runs forward passes in (for work done before the first step)."""

    @abstractmethod
    def step_batches(self, tokens_seen: int, say: Callable[[str], None]) -> StepBatches:
        """The next step's micro-batches (this process's); may begin a new stage and say so."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss (a scalar to backpropagate after weighting) and figures to log
        (scalars; the loop averages them over the step with the same weights)."""

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float] | None:
        """Held-out figures (``val_loss`` first), or None without held-out data."""
        return None

    def stop_reason(self) -> str | None:
        """Why the run should end before ``total_steps`` (early stopping on held-out figures), or
        None; asked before every step, so a resumed run that had stopped stops again."""
        return None

    def data_state(self) -> dict[str, Any]:
        """Where the data iterators are (saved in every checkpoint)."""
        return {}

    def load_data_state(self, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        """Restore what :meth:`data_state` returned (before :meth:`start`)."""

    def checkpoint_extra(self, model: nn.Module) -> dict[str, Any]:
        """JSON-serialisable figures the objective needs back on resume (stage, RoPE base, ...)."""
        return {}

    def checkpoint_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The weights a training checkpoint holds; None: the whole model."""
        return None

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
        """Put the weights of a training checkpoint (as :meth:`checkpoint_weights` chose) into ``model``."""
        model.load_state_dict(weights, strict=True)

    def step_figures(self) -> dict[str, float]:
        """Figures of the step just taken that the metrics record (e.g. the share of each data source)."""
        return {}

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        """Training FLOPs per token for MFU, or None where no honest figure exists."""
        return None

    @abstractmethod
    def export(self, run_dir: Path, model: nn.Module, distributed: bool) -> Path | None:
        """Write the run's result (``run_dir/final``, ...) and return where it is."""

    def summary(self) -> dict[str, Any]:
        """Fields the objective adds to the run's summary."""
        return {}
