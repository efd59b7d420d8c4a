"""The evaluation task registry and the result row every task produces.

A task is a subclass of :class:`EvalTask` registered under a name with :func:`register_task`;
``llamalab eval --tasks a,b`` looks each name up with :func:`get_task` and calls its ``run``
with an :class:`~llamalab.eval.lm.EvalModel`. Each task returns :class:`TaskResult` rows (one
per metric, and per sub-task where it has them, e.g. ``mmlu/abstract_algebra``).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamalab.eval.lm import EvalModel

__all__ = ["EvalTask", "TaskResult", "get_task", "mean_stderr", "register_task", "task_names", "warn"]


@dataclass
class TaskResult:
    """One row of the results table: a metric of a task (or sub-task) over ``n`` examples."""

    task: str  # e.g. "hellaswag", "mmlu", "mmlu/abstract_algebra"
    metric: str  # e.g. "acc", "acc_norm_char", "acc_uncond", "exact_match", "pass@1", "ppl"
    value: float
    stderr: float | None
    n: int
    details: dict[str, Any] = field(default_factory=dict)  # source split/size, shots, truncations, failures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN values become None: JSON has no NaN)."""
        row = asdict(self)
        for key in ("value", "stderr"):
            if isinstance(row[key], float) and not math.isfinite(row[key]):
                row[key] = None
        return row


class EvalTask:
    """A benchmark: knows its data, its prompt format and its metrics.

    Subclasses set ``name`` (filled in by :func:`register_task` when left empty), ``source``
    (human text naming the data: package, config, split and size) and ``default_shots``, and
    implement :meth:`run`.
    """

    name: str = ""
    source: str = ""
    default_shots: int = 0
    # A task that saves its progress in parts (MMLU: per subject) sets this; its ``run`` then takes
    # ``partial`` (a dict it fills, kept in the results file) and ``save`` (writes that file).
    resumable: bool = False

    def run(self, lm: EvalModel, *, shots: int | None, limit: int | None, seed: int,
            progress: bool) -> list[TaskResult]:
        """Evaluate ``lm``: ``shots`` None means ``default_shots``; ``limit`` caps the examples."""
        raise NotImplementedError(f"{type(self).__name__}.run")

    def describe(self) -> str:
        """One line for ``llamalab eval list``."""
        return self.source


_REGISTRY: dict[str, type[EvalTask]] = {}
# Modules that register tasks. Imported lazily (on the first lookup) so that importing
# llamalab.eval stays cheap; a module not written yet (ImportError) is skipped.
_TASK_MODULES = ("llamalab.eval.multiple_choice", "llamalab.eval.generation", "llamalab.eval.code")
_loaded = False


def register_task(name: str) -> Callable[[type[EvalTask]], type[EvalTask]]:
    """Class decorator: make ``get_task(name)`` return an instance of the class."""

    def decorate(cls: type[EvalTask]) -> type[EvalTask]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"eval task {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_task_modules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but something it imports is missing
                raise


def task_names() -> list[str]:
    """The registered task names, sorted."""
    _load_task_modules()
    return sorted(_REGISTRY)


def get_task(name: str) -> EvalTask:
    """A fresh instance of the task registered as ``name``; an unknown name is a ValueError listing the known ones."""
    _load_task_modules()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(task_names())}")
    task = cls()
    if not task.name:
        task.name = name
    return task


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values``: sample standard deviation (n-1) / sqrt(n), as lm-eval.

    NaN for fewer than two values (no spread to measure).
    """
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    var = sum((x - mu) ** 2 for x in values) / (n - 1)
    return math.sqrt(var / n)


_warned: set[str] = set()


def warn(message: str, *, once_key: str | None = None) -> None:
    """Print a warning on stderr; with ``once_key``, only the first time that key is seen."""
    if once_key is not None:
        if once_key in _warned:
            return
        _warned.add(once_key)
    print(f"llamalab eval: warning: {message}", file=sys.stderr)
