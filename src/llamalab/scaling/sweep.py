"""The IsoFLOPs sweep: every (compute budget, model shape) pair trained by the project's own loop.

For a budget C and a shape, the model's training FLOPs per token come from
:func:`llamalab.train.metrics.flops_per_token` (6 N + 12 n_layers dim seq_len), so the run may
train on D = C / flops_per_token tokens: ``total_steps = round(D / global_batch_tokens)``
(at least 1), i.e. within half a batch of the budget. Everything else is the run file's
(data, batch, optimizer, precision), with four changes the method needs:

- the model: the ``tiny`` preset with the shape's width/depth/heads and the run file's
  vocabulary, context, tied head, RoPE base and norm epsilon (:mod:`llamalab.scaling.sizes`);
- ``train.total_steps`` as above;
- ``eval.every = total_steps``: one validation loss, on the final weights;
- ``optim.warmup_steps`` capped at a tenth of the run's steps (the run file's warmup would
  otherwise be most of a small budget's run, or longer than it).

Each run has its own run_dir ``OUT/c<budget>/<shape>`` (``c1e12/64x2``). ``OUT/sweep.json``
(:mod:`llamalab.scaling.records`) is rewritten atomically before and after every run. Running the
sweep again skips runs that are done and resumes the others from their newest checkpoint (the
trainer's own resume); budgets or sizes added on the command line join the same sweep. A run
whose settings differ from what sweep.json recorded for it is an error, not a silent mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalab.scaling.records import SWEEP_FILE, VERSION, ScalingError, read_sweep, write_json_atomic
from llamalab.scaling.sizes import ModelShape

__all__ = ["RunPlan", "budget_tag", "format_plan", "plan_sweep", "run_sweep"]

LOG_FILE = "sweep.log"
WARMUP_CAP = 0.1  # of a run's steps


def budget_tag(budget: float) -> str:
    """The run-dir name of a budget: ``1e+12`` -> ``c1e12``, ``2.5e+09`` -> ``c2.5e9``."""
    text = f"{budget:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return "c" + text


@dataclass
class RunPlan:
    """One run of the sweep: its budget, shape, run file and the arithmetic of its token budget."""

    budget: float
    shape: ModelShape
    run_dir: Path
    rel_dir: str  # run_dir relative to the sweep folder (what sweep.json records)
    cfg: Any  # llamalab.train.config.TrainConfig
    params: int
    params_matmul: int
    flops_per_token: float
    tokens_budget: float
    steps: int
    batch_tokens: int
    train_tokens: int  # in the run file's training shards: tokens / train_tokens = epochs

    @property
    def tokens(self) -> int:
        """Tokens the run trains on: ``steps * global_batch_tokens``."""
        return self.steps * self.batch_tokens

    @property
    def epochs(self) -> float:
        """Passes over the training shards the run makes (the sweep's small corpora repeat)."""
        return self.tokens / self.train_tokens if self.train_tokens else math.inf

    @property
    def key(self) -> tuple[str, str]:
        """(budget, shape) as sweep.json identifies a run."""
        return f"{self.budget:.6g}", self.shape.name

    def config_sha256(self) -> str:
        """A digest of the run's whole config except run_dir: a rerun must plan the same run."""
        d = self.cfg.to_dict()
        d.pop("run_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def plan_sweep(config: str | None, overrides: Sequence[str], budgets: Sequence[float], shapes: Sequence[ModelShape],
               out: str | Path) -> list[RunPlan]:
    """The runs of the sweep, budget by budget, each checked as a run file (ConfigError / ScalingError
    before any compute)."""
    from llamalab.config import get_preset
    from llamalab.train.config import TrainConfig, load_config
    from llamalab.train.metrics import flops_per_token

    base = load_config(config, overrides)
    src = config or "defaults"
    if base.stages:
        raise ScalingError(f"{src}: has [[stages]]; a sweep needs one batch shape for the whole run "
                           f"(FLOPs per token and tokens per step fixed)")
    if base.model.checkpoint:
        raise ScalingError(f"{src}: model.checkpoint is set; a sweep trains every shape from scratch")
    if not base.data.val_shards or not base.eval.batches:
        raise ScalingError(f"{src}: data.val_shards and eval.batches > 0 are needed: the sweep fits the final "
                           f"validation loss")
    if not budgets:
        raise ScalingError("--budgets: empty; expected compute budgets in FLOPs, e.g. 1e12,3e12,1e13")
    m = base.model_config()
    from llamalab.data import read_shard
    from llamalab.train.loop import resolve_shards

    train_tokens = sum(read_shard(p).n_tokens for name, source in base.data.sources.items()
                       for p in resolve_shards(source.shards, f"data.sources.{name}.shards"))
    keep = {"vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len, "tie_embeddings": m.tie_embeddings,
            "rope_theta": m.rope_theta, "norm_eps": m.norm_eps}
    t = base.train
    out = Path(out)
    plans = []
    for budget in sorted(budgets):
        for shape in shapes:
            d = base.to_dict()
            d["model"] = {"preset": "tiny", "overrides": {**keep, **shape.overrides()}, "checkpoint": None}
            run_dir = out / budget_tag(budget) / shape.name
            d["run_dir"] = str(run_dir)
            try:
                mc = get_preset("tiny", **d["model"]["overrides"])
            except (TypeError, ValueError) as err:
                raise ScalingError(f"--sizes {shape.name}: {err}") from None
            fpt = flops_per_token(mc, t.seq_len)
            tokens_budget = budget / fpt
            steps = max(1, round(tokens_budget / t.global_batch_tokens))
            d["train"]["total_steps"] = steps
            d["eval"]["every"] = steps
            d["optim"]["warmup_steps"] = min(base.optim.warmup_steps, int(WARMUP_CAP * steps))
            cfg = TrainConfig.from_dict(d, source=f"{src} + sweep run {budget:g} FLOPs, size {shape.name} "
                                                  f"({steps} steps)")
            plans.append(RunPlan(budget, shape, run_dir, str(run_dir.relative_to(out)), cfg, mc.num_params(),
                                 mc.num_params(include_embeddings=False) + mc.vocab_size * mc.dim, fpt,
                                 tokens_budget, steps, t.global_batch_tokens, train_tokens))
    return plans


def format_plan(plans: Sequence[RunPlan]) -> str:
    """The plan as a table (``--dry-run``): per run the params, FLOPs/token, tokens and steps."""
    lines = [f"{'budget':>9}  {'size':>8}  {'params':>9}  {'FLOPs/token':>11}  {'tokens':>10}  {'steps':>6}  "
             f"{'epochs':>6}"]
    for p in plans:
        lines.append(f"{p.budget:>9.3g}  {p.shape.name:>8}  {p.params:>9,}  {p.flops_per_token:>11.3g}  "
                     f"{p.tokens:>10,}  {p.steps:>6}  {p.epochs:>6.2f}" + ("  (few steps)" if p.steps < 10 else ""))
    total = sum(p.tokens * p.flops_per_token for p in plans)
    lines.append(f"{len(plans)} runs, {total:.3g} training FLOPs in all")
    return "\n".join(lines)


def _fmt_count(n: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _new_doc(config: str | None, overrides: Sequence[str], task: dict[str, Any] | None) -> dict[str, Any]:
    return {"version": VERSION, "config": config, "overrides": list(overrides), "budgets": [], "sizes": [],
            "task": task, "runs": []}


def _merge_task(doc: dict[str, Any], task: dict[str, Any] | None, path: Path) -> dict[str, Any] | None:
    """The task the sweep scores: the one asked for, or the one sweep.json was scored on."""
    had = doc.get("task")
    if task is None:
        return had
    if had is not None and had != task:
        raise ScalingError(f"{path}: this sweep is scored on {had}; --task asks for {task}; use the same "
                           f"--task (or none) or another --out")
    return task


def run_sweep(config: str | None, overrides: Sequence[str], budgets: Sequence[float], shapes: Sequence[ModelShape],
              out: str | Path, *, task: dict[str, Any] | None = None, verbose: bool = False,
              echo: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Train (or skip, or resume) every run of the sweep; return (the sweep.json document, whether
    every run is done). ``task``: {"name", "limit", "shots"} of a multiple-choice task to score
    each final model on. One line per run through ``echo``; the trainer's own messages go to
    the run's ``sweep.log`` unless ``verbose`` (then they, and its progress bar, go to stderr)."""
    out = Path(out)
    plans = plan_sweep(config, overrides, budgets, shapes, out)
    path = out / SWEEP_FILE
    doc = read_sweep(path) if path.exists() else _new_doc(config, overrides, None)
    task = _merge_task(doc, task, path)
    if task is not None:
        from llamalab.scaling.downstream import check_task

        check_task(task["name"])
    doc["task"] = task
    doc["config"], doc["overrides"] = config, list(overrides)
    doc["budgets"] = sorted({*doc.get("budgets", []), *(float(b) for b in budgets)})
    known = {s["name"] for s in doc.get("sizes", [])}
    doc["sizes"] = list(doc.get("sizes", [])) + [s.to_dict() for s in shapes if s.name not in known]
    entries = {(f"{r['budget']:.6g}", r["size"]): r for r in doc["runs"]}
    for i, p in enumerate(plans):
        e = entries.get(p.key)
        if e is None:
            e = {"budget": p.budget, "size": p.shape.name, "run_dir": p.rel_dir, "status": "pending"}
            doc["runs"].append(e)
            entries[p.key] = e
        elif e.get("config_sha256") not in (None, p.config_sha256()):
            raise ScalingError(f"{path}: the run {p.rel_dir} was trained with other settings (run file, overrides "
                               f"or data paths changed); rerun with the same ones, or use another --out")
        e.update({"shape": p.shape.to_dict(), "params": p.params, "params_matmul": p.params_matmul,
                  "flops_per_token": p.flops_per_token, "tokens_budget": p.tokens_budget, "steps": p.steps,
                  "batch_tokens": p.batch_tokens, "seq_len": p.cfg.train.seq_len, "epochs": p.epochs, "config_sha256": p.config_sha256()})
    write_json_atomic(path, doc)
    done = sum(1 for p in plans if _is_done(entries[p.key], task, out))
    to_go = sum(p.tokens * p.flops_per_token for p in plans if not _is_done(entries[p.key], task, out))
    echo(f"scaling sweep: {len(set(p.budget for p in plans))} budget(s) x {len(shapes)} size(s) = {len(plans)} runs "
         f"({done} done before) -> {path}; {to_go:.3g} training FLOPs to go")
    width = len(str(len(plans)))
    for i, p in enumerate(plans, 1):
        e = entries[p.key]
        head = f"[{i:>{width}}/{len(plans)}] C={p.budget:<8.3g} {p.shape.name:>8}"
        if _is_done(e, task, out):
            echo(f"{head}  done before (val loss {e['val_loss']:.4f}): skipped")
            continue
        finished = _run_one(p, e, task, out, path, doc, verbose)
        if not finished:
            echo(f"{head}  preempted (SIGTERM): checkpoint saved; run the same command to resume")
            return doc, False
        if e["status"] != "done":
            echo(f"{head}  failed: {e.get('error')} (see {p.run_dir / LOG_FILE}); the sweep goes on")
            continue
        line = (f"{head}  {_fmt_count(p.params)} params, {_fmt_count(e['tokens'])} tokens ({p.steps} steps): "
                f"val loss {e['val_loss']:.4f}")
        if task is not None:
            line += f", {task['name']} nll/char {e['nll']:.4f} acc {e['acc']:.3f}"
        echo(line + f"  {e['wall_s']:.0f} s")
    return doc, all(entries[p.key]["status"] == "done" for p in plans)


def _is_done(e: dict[str, Any], task: dict[str, Any] | None, out: Path) -> bool:
    return (e.get("status") == "done" and (out / e["run_dir"] / "final").is_dir()
            and (task is None or e.get("nll") is not None))


def _run_one(p: RunPlan, e: dict[str, Any], task: dict[str, Any] | None, out: Path, path: Path,
             doc: dict[str, Any], verbose: bool) -> bool:
    """Train (resume) one run, score it, record it; False if the trainer was preempted."""
    from llamalab.train.loop import TrainingError, train

    e["status"] = "running"
    e.pop("error", None)
    write_json_atomic(path, doc)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(p.run_dir / LOG_FILE, "a") as log, \
            (contextlib.nullcontext() if verbose else contextlib.redirect_stderr(log)):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} scaling sweep: {p.rel_dir}, {p.steps} steps", file=sys.stderr)
        try:
            summary = train(p.cfg, progress=verbose)
        except TrainingError as err:
            e["status"], e["error"] = "failed", str(err)
            print(f"failed: {err}", file=sys.stderr)
            write_json_atomic(path, doc)
            return True
        e["train_wall_s"] = e.get("train_wall_s", 0.0) + time.perf_counter() - t0  # summed over sessions
        e["wall_s"] = e["train_wall_s"]
        if summary["status"] == "preempted":
            write_json_atomic(path, doc)
            return False
        if summary.get("val_loss") is None or not math.isfinite(summary["val_loss"]):
            e["status"], e["error"] = "failed", "no final validation loss in the run's metrics"
            write_json_atomic(path, doc)
            return True
        e.update({"tokens": summary["tokens_seen"], "flops": summary["tokens_seen"] * p.flops_per_token,
                  "val_loss": summary["val_loss"], "train_loss": summary["train_loss"]})
        if task is not None:
            from llamalab.scaling.downstream import score_task

            t1 = time.perf_counter()
            scored = score_task(p.run_dir / "final", task["name"], limit=task["limit"], shots=task["shots"])
            e.update(scored)
            e["eval_wall_s"] = time.perf_counter() - t1
    e["wall_s"] = e.get("train_wall_s", 0.0) + e.get("eval_wall_s", 0.0)
    e["status"] = "done"
    write_json_atomic(path, doc)
    return True
