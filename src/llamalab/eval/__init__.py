"""Evaluation: LLaMA-paper zero/few-shot scoring, perplexity, generation tasks and the lm-eval bridge.

``get_task(name).run(EvalModel.load(...), ...)`` evaluates one task; ``llamalab eval`` runs many
and writes a results JSON and a markdown table (``llamalab.eval.results``).
"""

from __future__ import annotations

from llamalab.eval.base import EvalTask, TaskResult, get_task, mean_stderr, register_task, task_names

__all__ = ["EvalModel", "EvalTask", "TaskResult", "get_task", "mean_stderr", "register_task", "task_names"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: EvalModel pulls in torch
    if name == "EvalModel":
        from llamalab.eval.lm import EvalModel

        return EvalModel
    raise AttributeError(name)
