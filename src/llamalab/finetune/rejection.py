"""Rejection-sampling fine-tuning (Llama 2 §3.2.3, Llama 3 §4.2.2).

For each prompt the policy writes K samples (batched through the generation engine, KV cache and
decode kernels, K rows a call), the reward model scores them, and the best is kept as an SFT
target; the SFT step is the ordinary SFT path (``finetune.method = "sft"``) on that set.

Sampling is resumable at prompt granularity: each finished prompt is one line appended (and
flushed) to ``samples.jsonl``, and the draws of prompt *i* at temperature *j* come from a
generator seeded with ``sample_seed(seed, i, j)`` alone, so a killed run that starts again
skips the prompts already written and produces, for the rest, exactly the samples an
uninterrupted run would have.

With several temperatures (Llama 2 Fig. 8: the best temperature moves from one iteration to the
next) every prompt is sampled K times at each; the report gives, per temperature, the expected
reward of the best of k samples for k = 1..K (Fig. 7), estimated without bias from the K
samples by order statistics (:func:`expected_best_of`). The SFT target is the best over all of a
prompt's samples, and, as Llama 2 did from RLHF-V4, over the selected samples of earlier
iterations (``rejection.keep_from``), re-scored with the current reward model so that the
rewards compare.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalab.finetune.data import (
    MISSING_FIELD,
    NOT_OBJECT,
    OVER_LONG,
    PROMPT_NOT_ENDING_WITH_USER,
    WRONG_TYPE,
    DataSummary,
    Message,
    RecordError,
    _check_user_first,
    _iter_json_lines,
    _messages,
)

__all__ = ["PromptRecord", "SamplingPlan", "answer_matches", "best_of_k_curve", "expected_best_of",
           "parse_prompt_record", "read_prompts", "read_samples", "run_sampling", "sample_seed", "sampling_report",
           "select_best", "plot_best_of_k", "rejection_finetune", "format_report", "plot_reward_histograms", "SAMPLES_FILE", "REPORT_FILE"]

SAMPLES_FILE = "samples.jsonl"
PLAN_FILE = "plan.json"
REPORT_FILE = "report.json"
SELECTED_FILE = "selected.jsonl"


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to sample: its conversation (ending with the user's turn) and what goes with it.

    ``index`` is the prompt's position among the valid prompts of the files: it seeds the draws and
    keys the resume. ``key`` names the prompt across iterations (the record's ``"id"``, else a hash
    of its messages) so that earlier iterations' samples find their prompt.
    """

    index: int
    key: str
    messages: tuple[Message, ...]
    tag: str | None = None  # e.g. "safety" (PPO's reward gate reads it)
    answer: str | None = None  # a checkable answer: each sample is marked correct or not
    file: str = ""
    line: int = 0


def prompt_key(messages: Sequence[Message]) -> str:
    """A stable name for a prompt without an ``id``: the first 16 hex digits of the SHA-256 of its messages."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_prompt_record(value: Any) -> tuple[tuple[Message, ...], str | None, str | None, str | None]:
    """(messages, id, tag, answer) of one prompt record.

    Accepted: ``{"prompt": str}``, ``{"messages": [...]}`` ending with the user's turn, and, so that
    existing data can serve as prompts, a conversation ending with the assistant (its last turn is
    dropped) or a preference pair (its prompt). Optional: ``"id"`` (a string or integer),
    ``"tag"`` (a string), ``"answer"`` (a string or number). Raises `RecordError`.
    """
    if not isinstance(value, dict):
        raise RecordError(NOT_OBJECT, f"a JSON {type(value).__name__}")
    if "messages" in value:
        msgs = _messages(value["messages"])
        if msgs[-1]["role"] == "assistant" and "chosen" not in value:
            msgs = msgs[:-1]
    elif "prompt" in value:
        if not isinstance(value["prompt"], str) or not value["prompt"].strip():
            raise RecordError(WRONG_TYPE, "'prompt' must be a non-empty string")
        msgs = ({"role": "user", "content": value["prompt"]},)
    else:
        raise RecordError(MISSING_FIELD, "'prompt' (a string) or 'messages'")
    if not msgs or msgs[-1]["role"] != "user":
        raise RecordError(PROMPT_NOT_ENDING_WITH_USER,
                          f"the last message is the {msgs[-1]['role']}'s" if msgs else "no messages")
    _check_user_first(msgs)
    out: list[str | None] = []
    for name, kinds in (("id", (str, int)), ("tag", (str,)), ("answer", (str, int, float))):
        v = value.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
            raise RecordError(WRONG_TYPE, f"{name!r} is {v!r}, expected " +
                              " or ".join({str: "a string", int: "an integer", float: "a number"}[k] for k in kinds))
        out.append(None if v is None else str(v))
    return msgs, out[0], out[1], out[2]


def read_prompts(paths: Iterable[str | Path], summary: DataSummary | None = None, *,
                 encode: Callable[[Sequence[Message]], list[int]] | None = None,
                 max_len: int | None = None) -> tuple[list[PromptRecord], DataSummary]:
    """Every valid prompt of the JSONL files ``paths``; bad records go to the summary with their line.

    With ``encode`` and ``max_len``, a prompt whose rendering is longer than ``max_len`` tokens is
    set aside as over-long (there would be no room left to answer)."""
    summary = summary if summary is not None else DataSummary()
    out: list[PromptRecord] = []
    for name, line, value in _iter_json_lines(paths, summary):
        try:
            msgs, rid, tag, answer = parse_prompt_record(value)
            if encode is not None and max_len is not None:
                n = len(encode(msgs))
                if n > max_len:
                    raise RecordError(OVER_LONG, f"{n} prompt tokens, at most {max_len} leave room to answer")
        except RecordError as e:
            summary.add(name, line, e.reason, e.detail)
            continue
        out.append(PromptRecord(len(out), rid if rid is not None else prompt_key(msgs), msgs, tag, answer,
                                name, line))
    return out, summary


def answer_matches(text: str, answer: str) -> bool:
    """Whether a response gives ``answer``.

    A numeric answer is compared as a number with the response's final answer as GSM8K is scored
    (``eval/generation.py: extract_number``: "The answer is N", "#### N", else the last number).
    Any other answer must appear in the response as whole words after SQuAD's normalisation.
    """
    from llamalab.eval.generation import extract_number, normalize_answer, numbers_equal

    try:
        float(answer.replace(",", ""))
        numeric = True
    except ValueError:
        numeric = False
    if numeric:
        return numbers_equal(extract_number(text), answer)
    want = normalize_answer(answer)
    return bool(want) and f" {want} " in f" {normalize_answer(text)} "


# ---------------------------------------------------------------- best of k


def expected_best_of(rewards: Sequence[float], k: int) -> float:
    """The expected maximum of ``k`` rewards drawn without replacement from ``rewards``.

    With the K rewards sorted ascending, the i-th (1-based) is the maximum of C(i-1, k-1) of the
    C(K, k) subsets of size k, so E[max] = sum_i C(i-1, k-1) / C(K, k) * r_(i): an unbiased
    estimate of the best-of-k reward of the policy from one set of K samples.
    """
    n = len(rewards)
    if not 1 <= k <= n:
        raise ValueError(f"expected_best_of: k={k} must be in [1, {n}] (the number of rewards)")
    r = sorted(rewards)
    total = math.comb(n, k)
    return sum(math.comb(i, k - 1) * r[i] for i in range(k - 1, n)) / total


def best_of_k_curve(rewards_per_prompt: Sequence[Sequence[float]], k_max: int | None = None) -> list[float]:
    """Mean over prompts of :func:`expected_best_of` for k = 1..k_max (default: the fewest samples a prompt has)."""
    if not rewards_per_prompt:
        return []
    k_max = k_max or min(len(r) for r in rewards_per_prompt)
    return [sum(expected_best_of(r, k) for r in rewards_per_prompt) / len(rewards_per_prompt)
            for k in range(1, k_max + 1)]


# ---------------------------------------------------------------- sampling


@dataclass
class SamplingPlan:
    """What to sample: K per prompt at each temperature, and the engine's other knobs."""

    k: int = 4
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    max_new_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"rejection.k={self.k}: expected an integer >= 1 (samples per prompt)")
        if not self.temperatures or any(not (isinstance(t, (int, float)) and t >= 0) for t in self.temperatures):
            raise ValueError(f"rejection.temperatures={self.temperatures}: expected a non-empty list of numbers >= 0")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"rejection.temperatures={self.temperatures}: a temperature is listed twice")
        if self.k > 1 and 0 in self.temperatures:
            raise ValueError("rejection.temperatures: 0 is greedy (K identical samples); use it with k = 1 only")
        if self.max_new_tokens < 1:
            raise ValueError(f"rejection.max_new_tokens={self.max_new_tokens}: expected >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rejection.top_p={self.top_p}: expected a number in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"rejection.top_k={self.top_k}: expected >= 0 (0 = off)")


def sample_seed(seed: int, index: int, t_index: int) -> int:
    """The seed of prompt ``index``'s draws at its ``t_index``-th temperature: a function of these
    three numbers only, so that what a prompt gets does not depend on which prompts ran before."""
    digest = hashlib.sha256(f"{seed}/{index}/{t_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _open_samples(out_dir: Path, meta: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The records already in ``out_dir/samples.jsonl`` (by prompt index), after checking that the
    directory holds the same plan; a line cut short by a kill is removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_file = out_dir / PLAN_FILE
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"{out_dir}: holds samples of a different plan (differs in {', '.join(diff)}); "
                             f"use another directory or delete it")
    else:
        tmp = plan_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, plan_file)
    path = out_dir / SAMPLES_FILE
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    good = 0  # bytes up to the end of the last complete record
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            break
        done[int(rec["index"])] = rec
        good += len(raw)
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
    return done


def run_sampling(generator: Any, prompts: Sequence[PromptRecord], plan: SamplingPlan, out_dir: str | Path, *,
                 score: Callable[[list[list[Message]]], list[float]] | None = None,
                 fmt: str | None = None, meta: dict[str, Any] | None = None, progress: bool = True,
                 stop_after: int | None = None) -> list[dict[str, Any]]:
    """Sample every prompt K times at each temperature, score, and append one record per prompt to
    ``out_dir/samples.jsonl``; prompts already there are skipped. Returns all records in prompt order.

    ``generator``: a :class:`~llamalab.generate.engine.Generator`. ``score``: rewards of closed
    conversations (``RewardModel.score``); without it samples carry no reward. ``meta``: what
    else identifies the run (policy, reward model, prompt files), checked on resume.
    ``stop_after``: return after that many newly finished prompts (for tests of resume).
    """
    from llamalab.generate.chat import chat_stop_ids, encode_chat
    from llamalab.generate.engine import GenerationConfig

    plan.validate()
    out_dir = Path(out_dir)
    full_meta = {**(meta or {}), "plan": asdict(plan), "prompts": len(prompts),
                 "prompt_keys": hashlib.sha256("\n".join(p.key for p in prompts).encode()).hexdigest()[:16]}
    done = _open_samples(out_dir, full_meta)
    tok = generator.tokenizer
    stops = tuple(sorted(chat_stop_ids(tok, fmt)))
    todo = [p for p in prompts if p.index not in done]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"sampling {out_dir.name}",
                   unit="prompt", file=sys.stderr)
    new = 0
    with (out_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
        for p in todo:
            if stop_after is not None and new >= stop_after:
                break
            ids = encode_chat(tok, list(p.messages), fmt=fmt)
            samples: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            for j, temp in enumerate(plan.temperatures):
                cfg = GenerationConfig(max_new_tokens=plan.max_new_tokens, temperature=float(temp), top_p=plan.top_p,
                                       top_k=plan.top_k, seed=sample_seed(plan.seed, p.index, j), stop_ids=stops)
                for r in generator.generate([ids] * plan.k, cfg):
                    samples.append({"text": r.text, "temperature": float(temp), "finish_reason": r.finish_reason,
                                    "tokens": len(r.ids)})
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if score is not None:
                rewards = score([[*p.messages, {"role": "assistant", "content": s["text"]}] for s in samples])
                for s, r in zip(samples, rewards):
                    s["reward"] = None if math.isnan(r) else float(r)  # NaN: longer than the RM's context
            score_s = time.perf_counter() - t0
            if p.answer is not None:
                for s in samples:
                    s["correct"] = answer_matches(s["text"], p.answer)
            rec = {"index": p.index, "key": p.key, "messages": list(p.messages), "tag": p.tag, "answer": p.answer,
                   "samples": samples, "gen_s": round(gen_s, 4), "score_s": round(score_s, 4)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()  # a finished prompt is never sampled again
            done[p.index] = rec
            new += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return [done[p.index] for p in prompts if p.index in done]


def read_samples(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a sampling directory, in prompt order (complete lines only)."""
    path = Path(out_dir) / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {SAMPLES_FILE} (not a sampling directory)")
    out = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            out.append(json.loads(raw))
    return sorted(out, key=lambda r: r["index"])


# ---------------------------------------------------------------- selection and report


def _selectable(s: dict[str, Any], drop_truncated: bool) -> bool:
    return (bool(s["text"].strip()) and s.get("reward") is not None
            and not (drop_truncated and s.get("finish_reason") == "length"))


def select_best(records: Sequence[dict[str, Any]], *, earlier: Sequence[dict[str, Any]] = (),
                drop_truncated: bool = True) -> list[dict[str, Any]]:
    """Best-of-K per prompt as SFT records ``{"messages": [..., best answer], "reward", "key", "origin"}``.

    ``earlier``: selected records of earlier iterations (with their ``reward`` re-scored by the
    current reward model); one of them wins over this iteration's samples when its reward is
    higher. Empty answers, and with ``drop_truncated`` answers cut by the token limit, are never
    selected; a prompt with no selectable sample has no record.
    """
    by_key: dict[str, list[dict[str, Any]]] = {}
    for e in earlier:
        by_key.setdefault(e["key"], []).append(e)
    out = []
    for rec in records:
        cands = [(s["reward"], "current", s["text"], s.get("correct")) for s in rec["samples"]
                 if _selectable(s, drop_truncated)]
        cands += [(e["reward"], e.get("origin_dir", "earlier"), e["messages"][-1]["content"], e.get("correct"))
                  for e in by_key.get(rec["key"], []) if e.get("reward") is not None]
        if not cands:
            continue
        # max() keeps the first of equal rewards: this iteration's samples come first.
        reward, origin, text, correct = max(cands, key=lambda c: c[0])
        item = {"messages": [*rec["messages"], {"role": "assistant", "content": text}], "reward": reward,
                "key": rec["key"], "origin": origin}
        if rec.get("tag") is not None:
            item["tag"] = rec["tag"]
        if correct is not None:
            item["correct"] = correct
        out.append(item)
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def sampling_report(records: Sequence[dict[str, Any]], selected: Sequence[dict[str, Any]] | None = None, *,
                    drop_truncated: bool = True) -> dict[str, Any]:
    """Figures of a sampling directory: throughput, and per temperature the best-of-k curve, the mean
    reward, and (prompts with answers) the share of correct samples, of correct RM picks and of
    prompts with at least one correct sample."""
    samples = [s for r in records for s in r["samples"]]
    gen_s = sum(r.get("gen_s", 0.0) for r in records)
    score_s = sum(r.get("score_s", 0.0) for r in records)
    tokens = sum(s["tokens"] for s in samples)
    temps = sorted({s["temperature"] for s in samples})
    rep: dict[str, Any] = {
        "prompts": len(records), "samples": len(samples), "generated_tokens": tokens,
        "generate_s": round(gen_s, 2), "score_s": round(score_s, 2),
        "samples_per_s": len(samples) / (gen_s + score_s) if gen_s + score_s else None,
        "generated_tok_per_s": tokens / gen_s if gen_s else None, "by_temperature": {}}
    for t in temps:
        per = [[s for s in r["samples"] if s["temperature"] == t] for r in records]
        row: dict[str, Any] = {
            "k": min((len(p) for p in per), default=0),
            "mean_tokens": _mean([s["tokens"] for p in per for s in p]),
            "truncated": _mean([float(s["finish_reason"] == "length") for p in per for s in p])}
        # A prompt with a sample the reward model could not score (longer than its context) is left out.
        rewarded = [[s["reward"] for s in p] for p in per if p and all(s.get("reward") is not None for s in p)]
        if rewarded:
            row["mean_reward"] = _mean([x for r in rewarded for x in r])
            row["best_of_k"] = best_of_k_curve(rewarded)
        checked = [p for p in per if p and all("correct" in s for s in p)]
        if checked:
            row["accuracy"] = _mean([float(s["correct"]) for p in checked for s in p])
            row["any_correct"] = _mean([float(any(s["correct"] for s in p)) for p in checked])
            picks = [max((s for s in p if _selectable(s, drop_truncated)), key=lambda s: s["reward"], default=None)
                     for p in checked if all(s.get("reward") is not None for s in p)]
            if picks:
                row["rm_pick_accuracy"] = _mean([float(s is not None and s["correct"]) for s in picks])
        rep["by_temperature"][f"{t:g}"] = row
    curves = {t: row["best_of_k"][-1] for t, row in rep["by_temperature"].items() if row.get("best_of_k")}
    if len(curves) > 1:
        rep["best_temperature"] = float(max(curves, key=curves.get))
    if selected is not None:
        rep["selected"] = {"n": len(selected), "mean_reward": _mean([s["reward"] for s in selected]),
                           "from_earlier": sum(s["origin"] != "current" for s in selected)}
        checked_sel = [s for s in selected if "correct" in s]
        if checked_sel:
            rep["selected"]["accuracy"] = _mean([float(s["correct"]) for s in checked_sel])
    return rep


def plot_best_of_k(report: dict[str, Any], path: str | Path, title: str = "reward of the best of k samples") -> Path | None:
    """Llama 2 Fig. 7's plot: mean over prompts of the best-of-k reward against k, one line per temperature."""
    rows = {t: r["best_of_k"] for t, r in report["by_temperature"].items() if r.get("best_of_k")}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, curve in rows.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"T = {t}")
    if max(len(c) for c in rows.values()) > 16:
        ax.set_xscale("log")
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("mean reward of the best of k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_histograms(series: dict[str, Sequence[float]], path: str | Path,
                           title: str = "reward distribution") -> Path | None:
    """Overlaid histograms (same bins) of several reward lists, e.g. all samples against the selected ones."""
    series = {k: list(v) for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in series.items():
        ax.hist(v, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(v)}, mean {sum(v) / len(v):.2f})")
    ax.set_xlabel("reward")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- one iteration, end to end


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rewards(records: Sequence[dict[str, Any]]) -> list[float]:
    return [s["reward"] for r in records for s in r["samples"] if s.get("reward") is not None]


def _eval_figures(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for r in records for s in r["samples"]]
    out: dict[str, Any] = {"prompts": len(records), "samples": len(samples),
                           "mean_reward": _mean([s["reward"] for s in samples if s.get("reward") is not None]),
                           "mean_tokens": _mean([s["tokens"] for s in samples]),
                           "truncated": _mean([float(s["finish_reason"] == "length") for s in samples])}
    checked = [s for s in samples if "correct" in s]
    if checked:
        out["accuracy"] = _mean([float(s["correct"]) for s in checked])
    return out


def rejection_finetune(cfg: Any, *, progress: bool = True, sample_only: bool = False) -> dict[str, Any]:
    """One iteration of rejection-sampling fine-tuning from the run file ``cfg`` (a ``TrainConfig``).

    1. ``run_dir/sampling/``: K samples per prompt of ``rejection.prompts`` at each temperature from
       ``model.checkpoint`` (the policy), scored by ``rejection.reward_model`` (resumable);
       ``report.json``, ``best-of-k.png`` and ``rewards.png`` beside them.
    2. ``run_dir/selected.jsonl``: the best answer per prompt, earlier iterations' included.
    3. Held-out prompts (``rejection.eval_prompts``) sampled with the policy: ``run_dir/eval-before/``.
    4. SFT on the selected set (plus ``finetune.train_data``, if any) with the run file's settings:
       ``run_dir/final`` (the loop's checkpoints and resume).
    5. The held-out prompts again with the fine-tuned policy: ``run_dir/eval-after/``, and the
       before/after figures and ``eval-rewards.png``.

    Every step resumes: running the same command again continues where it stopped. Returns the
    SFT summary with the figures under ``"rejection"`` (only the figures with ``sample_only``).
    """
    import dataclasses
    import gc

    import torch

    from llamalab.api import load
    from llamalab.finetune.datasets import write_jsonl
    from llamalab.finetune.objectives import _expand, finetune
    from llamalab.finetune.reward import load_reward_model
    from llamalab.generate.chat import encode_chat
    from llamalab.generate.engine import Generator
    from llamalab.train.config import ConfigError

    rj = cfg.rejection
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("rejection-sample runs in one process; to run its SFT step under torchrun, use "
                          "llamalab finetune with finetune.train_data = [\"RUN_DIR/selected.jsonl\"]")
    if not rj.reward_model:
        raise ConfigError("rejection.reward_model: not set; expected a reward model directory (run_dir/final of "
                          "a llamalab finetune run with finetune.method = \"reward\")")
    if not (Path(rj.reward_model) / "reward_head.safetensors").is_file():
        raise ConfigError(f"rejection.reward_model: {rj.reward_model}: not a reward model (no reward_head.safetensors)")
    if not rj.prompts:
        raise ConfigError("rejection.prompts: empty; expected JSONL prompt files ({\"prompt\": ...} or {\"messages\": ...})")
    if cfg.finetune.method != "sft":
        raise ConfigError(f"finetune.method={cfg.finetune.method!r}: rejection sampling fine-tunes with SFT; "
                          f"set it to \"sft\"")
    if not cfg.model.checkpoint:
        raise ConfigError("model.checkpoint: not set; expected the policy to sample from")
    prompt_paths = _expand(rj.prompts, "rejection.prompts")
    eval_paths = _expand(rj.eval_prompts, "rejection.eval_prompts") if rj.eval_prompts else []
    for d in rj.keep_from:
        if not (Path(d) / SELECTED_FILE).is_file():
            raise ConfigError(f"rejection.keep_from: {d}: no {SELECTED_FILE} (expected an earlier rejection-sample "
                              f"run directory)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if rj.precision == "bf16" else torch.float32
    fmt = None if cfg.finetune.chat_format == "auto" else cfg.finetune.chat_format

    def log(msg: str) -> None:
        print(f"rejection-sample: {msg}", file=sys.stderr, flush=True)

    def sample(policy_path: str, paths: list[Path], plan: SamplingPlan, name: str) -> tuple[list[dict[str, Any]], Any]:
        """Load the policy and the reward model, sample ``paths`` into ``run_dir/name``."""
        policy = load(policy_path, dtype=dtype)
        tok = policy.tokenizer
        gen = Generator(policy.model, tok)
        rm = load_reward_model(rj.reward_model, dtype=dtype)
        prompts, summary = read_prompts(paths, encode=lambda m: encode_chat(tok, list(m), fmt=fmt),
                                        max_len=policy.config.max_seq_len - plan.max_new_tokens)
        if summary.set_aside:
            log(f"{name}: set aside {len(summary.set_aside):,} of {summary.seen:,} prompt records: "
                + "; ".join(str(x) for x in summary.set_aside[:3]) + (" ..." if len(summary.set_aside) > 3 else ""))
        if not prompts:
            raise ConfigError(f"{', '.join(map(str, paths))}: no usable prompts ({summary.format()})")
        meta = {"policy": policy_path, "reward_model": str(rj.reward_model), "chat_format": fmt,
                "precision": rj.precision, "files": [str(p) for p in paths]}
        records = run_sampling(gen, prompts, plan, run_dir / name, score=lambda c: rm.score(c, batch_size=8, too_long="nan"),
                               fmt=fmt, meta=meta, progress=progress)
        return records, (rm, summary)

    torch.manual_seed(cfg.seed)
    plan = SamplingPlan(rj.k, [float(t) for t in rj.temperatures], rj.max_new_tokens, rj.top_p, rj.top_k, cfg.seed)
    records, (rm, psum) = sample(str(cfg.model.checkpoint), prompt_paths, plan, "sampling")
    keys = {r["key"] for r in records}
    earlier: list[dict[str, Any]] = []
    for d in rj.keep_from:
        prev = [e for e in _read_jsonl(Path(d) / SELECTED_FILE) if e.get("key") in keys]
        # Re-scored: an earlier iteration's reward model (or its scale) may differ from this one's.
        for e, r in zip(prev, rm.score([e["messages"] for e in prev], batch_size=8, too_long="nan")):
            if not math.isnan(r):
                earlier.append({**e, "reward": float(r), "origin_dir": str(d)})
    selected = select_best(records, earlier=earlier, drop_truncated=rj.drop_truncated)
    selected_path = write_jsonl(selected, run_dir / SELECTED_FILE)
    report = sampling_report(records, selected, drop_truncated=rj.drop_truncated)
    report["prompts_set_aside"] = len(psum.set_aside)
    sdir = run_dir / "sampling"
    plot_best_of_k(report, sdir / "best-of-k.png")
    plot_reward_histograms({"all samples": _rewards(records),
                            "selected (best of each prompt)": [s["reward"] for s in selected]},
                           sdir / "rewards.png", title="reward of the samples and of the selected answers")
    (sdir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log(f"{report['prompts']:,} prompts, {report['samples']:,} samples at {report['samples_per_s'] or 0:.2f} "
        f"samples/s ({report['generated_tok_per_s'] or 0:.1f} generated tok/s); {len(selected):,} selected "
        f"-> {selected_path}")
    eval_plan = SamplingPlan(rj.eval_k, [float(rj.eval_temperature)], rj.max_new_tokens, rj.top_p, rj.top_k,
                             cfg.seed + 1)
    before = None
    if eval_paths:
        before, _ = sample(str(cfg.model.checkpoint), eval_paths, eval_plan, "eval-before")
    del rm
    gc.collect()
    result: dict[str, Any] = {"rejection": report}
    if not sample_only and not selected:
        every = [s for r in records for s in r["samples"]]
        cut = sum(s["finish_reason"] == "length" for s in every)
        raise ConfigError(f"rejection-sample: no prompt has an answer to select ({len(every):,} samples: {cut:,} cut by "
                          f"rejection.max_new_tokens={rj.max_new_tokens}, "
                          f"{sum(not s['text'].strip() for s in every):,} empty, "
                          f"{sum(s.get('reward') is None for s in every):,} longer than the reward model's context); "
                          f"raise max_new_tokens or set rejection.drop_truncated = false")
    if not sample_only:
        sft_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(
            cfg.finetune, train_data=[*cfg.finetune.train_data, str(selected_path)]))
        result = {**finetune(sft_cfg, progress=progress), "rejection": report}
        if eval_paths and result.get("final"):
            after, _ = sample(str(result["final"]), eval_paths, eval_plan, "eval-after")
            assert before is not None
            fb, fa = _eval_figures(before), _eval_figures(after)
            report["eval"] = {"before": fb, "after": fa}
            plot_reward_histograms({"before (the starting policy)": _rewards(before),
                                    "after (the fine-tuned policy)": _rewards(after)},
                                   run_dir / "eval-rewards.png", title="held-out reward before and after")
            line = f"held out: mean reward {fb['mean_reward']:.3f} -> {fa['mean_reward']:.3f}"
            if "accuracy" in fb:
                line += f", accuracy {100 * fb['accuracy']:.1f}% -> {100 * fa['accuracy']:.1f}%"
            result.setdefault("notes", []).append(line)
    elif before is not None:
        report["eval"] = {"before": _eval_figures(before)}
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return result


def format_report(report: dict[str, Any]) -> str:
    """The figures of :func:`rejection_finetune` as a Markdown table or two."""
    def pct(x: Any) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    def num(x: Any) -> str:
        return "—" if x is None else f"{x:.3f}"

    lines = [f"{report['prompts']:,} prompts, {report['samples']:,} samples, {report['samples_per_s'] or 0:.2f} "
             f"samples/s, {report['generated_tok_per_s'] or 0:.1f} generated tok/s "
             f"(generate {report['generate_s']:.0f} s, score {report['score_s']:.0f} s)", "",
             "| T | k | mean reward | best of k | correct | RM's pick correct | any correct | tokens | cut by limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t, r in report["by_temperature"].items():
        best = r.get("best_of_k") or [None]
        lines.append(f"| {t} | {r['k']} | {num(r.get('mean_reward'))} | {num(best[-1])} | {pct(r.get('accuracy'))} | "
                     f"{pct(r.get('rm_pick_accuracy'))} | {pct(r.get('any_correct'))} | {r['mean_tokens'] or 0:.1f} | "
                     f"{pct(r['truncated'])} |")
    sel = report.get("selected")
    if sel:
        lines += ["", f"selected: {sel['n']:,} answers, mean reward {num(sel['mean_reward'])}"
                  + (f", {pct(sel['accuracy'])} correct" if "accuracy" in sel else "")
                  + (f", {sel['from_earlier']:,} from earlier iterations" if sel["from_earlier"] else "")]
    ev = report.get("eval")
    if ev:
        lines += ["", "| held-out prompts | mean reward | correct | tokens |", "|---|---|---|---|"]
        for name, e in ev.items():
            lines.append(f"| {name} | {num(e['mean_reward'])} | {pct(e.get('accuracy'))} | {e['mean_tokens'] or 0:.1f} |")
    return "\n".join(lines)
