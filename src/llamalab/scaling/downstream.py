"""A sweep model's downstream figures: the normalised NLL of the correct answer and the accuracy.

Llama 3 (§3.2.1, figure 4) relates compute to a benchmark through "the normalized negative
log-likelihood on the correct answer" (per character, the figure's axis) and that NLL to
accuracy. Both come from one scoring pass of the project's evaluation code, as
``llamalab eval`` scores a multiple-choice task: the task's own prompts
(``MultipleChoiceTask.prompts``), lm-eval's context/continuation split (``EvalModel.encode_pair``),
the batched, KV-cached log-likelihoods (``EvalModel.loglikelihood_tokens``) and the task's
correctness rules (``example_metrics``). Per question:

    nll = -log P(" " + correct answer | prompt) / len(correct answer in characters)

and the accuracy is ``acc_norm_char`` (the choice with the highest log-likelihood per
character: LLaMA's rule, ARC's headline metric), so the NLL and the accuracy divide by the
same length.
"""

from __future__ import annotations

import os
from typing import Any

from llamalab.scaling.records import ScalingError

__all__ = ["ACC_METRIC", "check_task", "score_task"]

ACC_METRIC = "acc_norm_char"


def check_task(name: str) -> None:
    """ScalingError unless ``name`` is a registered multiple-choice task (checked before any training)."""
    from llamalab.eval.base import get_task, task_names
    from llamalab.eval.multiple_choice import MultipleChoiceTask

    try:
        task = get_task(name)
    except ValueError as e:
        raise ScalingError(f"--task: {e}") from None
    if not isinstance(task, MultipleChoiceTask):
        mc = [n for n in task_names() if isinstance(get_task(n), MultipleChoiceTask)]
        raise ScalingError(f"--task {name!r}: not a multiple-choice task scored by likelihood; expected one of "
                           f"{', '.join(mc)}")
    from llamalab.eval.data import load_split

    try:
        load_split(task.dataset)
    except OSError as e:
        raise ScalingError(f"--task {name!r}: {e}") from None


def score_task(model_dir: str | os.PathLike[str], name: str, *, limit: int | None, shots: int = 0, seed: int = 1234,
               batch_size: int = 16) -> dict[str, Any]:
    """Score the model in ``model_dir`` (a run's ``final/``) on the multiple-choice task ``name``:
    mean per-character NLL of the correct answers (``nll``), accuracy (``acc``, acc_norm_char),
    unnormalised accuracy (``acc_raw``), the accuracy of guessing (``chance``, the mean of
    1 / choices) and the number of questions (``n``)."""
    import torch

    from llamalab.eval.base import get_task
    from llamalab.eval.lm import EvalModel
    from llamalab.eval.multiple_choice import TARGET_DELIMITER, example_metrics

    task = get_task(name)
    lm = EvalModel.load(model_dir, dtype=torch.float32, batch_size=batch_size)
    prompted = task.prompts(lm, shots, limit, seed)
    requests = [(p.prefix + c, TARGET_DELIMITER + x)
                for p in prompted for c, x in zip(p.example.contexts, p.example.continuations)]
    scores = [s for s, _ in lm.loglikelihood_tokens([lm.encode_pair(c, x) for c, x in requests])]
    nll, acc, acc_raw, chance, i = 0.0, 0.0, 0.0, 0.0, 0
    for p in prompted:
        ex = p.example
        chance += 1.0 / len(ex.contexts)
        ll = scores[i:i + len(ex.contexts)]
        i += len(ex.contexts)
        nll += -ll[ex.gold] / max(len(ex.continuations[ex.gold]), 1)
        m = example_metrics(ex, ll)
        acc += m[ACC_METRIC]
        acc_raw += m["acc"]
    n = len(prompted)
    if not n:
        raise ScalingError(f"--task {name!r}: no questions to score (--task-limit {limit})")
    return {"nll": nll / n, "acc": acc / n, "acc_raw": acc_raw / n, "chance": chance / n, "n": n,
            "truncated": lm.truncated}
