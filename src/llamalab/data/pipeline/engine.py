"""Builds each source's datatrove pipeline and runs it on a local, Ray or Slurm executor.

A source runs as (at most) two datatrove stages, each with its own logging directory holding
datatrove's per-task stats and completion markers (``RUN_DIR/logs/<source>/<stage>/``):

1. ``process`` (``executor.tasks`` tasks): the source module's reader and steps
   (``sources.<type>.build_steps``) and a JSONL writer to ``RUN_DIR/<source>/processed/``.
   Input files are split among the tasks.
2. ``dedup`` (``executor.dedup_tasks`` tasks): every task reads all of stage 1's output and keeps
   the documents whose content hash falls in its partition, first occurrence first: together the
   tasks drop every exact duplicate of the source (CCNet's dedup across dumps, the MD5 dedup of
   GitHub files). Writes ``RUN_DIR/<source>/output/``. Without ``exact_dedup`` stage 1 writes
   there directly.

Re-running a config skips the tasks whose completion marker exists and redoes the others, which
rewrite their own output files from scratch: a run killed mid-way ends with the same files as an
uninterrupted one. The same pipeline objects go to `LocalPipelineExecutor`,
`RayPipelineExecutor` or `SlurmPipelineExecutor` unchanged.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from datatrove.pipeline.base import PipelineStep

from .common import ExactDedupFilter
from .config import DataRunConfig, SourceConfig, expand_inputs
from .readers import JsonlReader

__all__ = ["Stage", "build_stages", "check_option_types", "make_executor", "run_config", "source_module"]

# The global dedup hash: MD5 as RedPajama dedups GitHub; any exact-content hash serves the others.
DEDUP_ALGORITHM = "md5"


def source_module(source_type: str) -> Any:
    """The module implementing a source type (``DEFAULTS`` and ``build_steps``)."""
    return importlib.import_module(f"llamalab.data.pipeline.sources.{source_type}")


@dataclass
class Stage:
    """One datatrove stage of a source: its steps, task count and directories."""

    source: str
    name: str  # "process" or "dedup"
    steps: list[PipelineStep]
    tasks: int
    logging_dir: str
    output_dir: str


def _writer(output_dir: str) -> PipelineStep:
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    return JsonlWriter(output_dir, output_filename="${rank}.jsonl", compression=None)


def check_option_types(defaults: dict[str, Any], options: dict[str, Any], where: str) -> None:
    """A source option must have its default's kind (a number for a number, a list for a list...).

    Unknown keys are left to the source's own check, which names them with the known ones.
    """
    for key, value in options.items():
        if key not in defaults or defaults[key] is None:
            continue
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                ok = value.is_integer()
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"{where}.options.{key} = {value!r}: expected {type(default).__name__} "
                             f"(like the default {default!r})")


def build_stages(cfg: DataRunConfig, src: SourceConfig) -> list[Stage]:
    """The stages of one source, ready for an executor."""
    module = source_module(src.type)
    where = f"{cfg.path}: sources.{src.name}"
    inputs = expand_inputs(src.inputs, where)
    check_option_types(module.DEFAULTS, src.options, where)
    try:
        steps = list(module.build_steps(inputs, dict(src.options), rejects_dir=cfg.rejects_dir(), name=src.name))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    base = cfg.source_dir(src.name)
    logs = os.path.join(cfg.run_dir, "logs", src.name)
    output = os.path.join(base, "output")
    tasks = src.tasks or cfg.executor.tasks
    if not src.exact_dedup:
        return [Stage(src.name, "process", steps + [_writer(output)], tasks, os.path.join(logs, "process"), output)]
    processed = os.path.join(base, "processed")
    os.makedirs(processed, exist_ok=True)  # the dedup stage reads it even when no document survived
    dedup = [
        # our own stage-1 files: a bad line there is counted in the stats, not written as a reject
        # (the reader's rejects file name belongs to stage 1's reader)
        JsonlReader([processed], shard=False, rejects_dir=None, name=src.name),
        ExactDedupFilter(algorithm=DEDUP_ALGORITHM, partitioned=True, rejects_dir=cfg.rejects_dir(), name=src.name,
                         step="global_exact_dedup"),
        _writer(output),
    ]
    return [
        Stage(src.name, "process", steps + [_writer(processed)], tasks, os.path.join(logs, "process"), processed),
        Stage(src.name, "dedup", dedup, cfg.executor.dedup_tasks, os.path.join(logs, "dedup"), output),
    ]


def make_executor(cfg: DataRunConfig, stage: Stage, depends: Any = None) -> Any:
    """The datatrove executor of ``cfg.executor.kind`` for one stage."""
    ex = cfg.executor
    if ex.kind == "local":
        from datatrove.executor.local import LocalPipelineExecutor

        return LocalPipelineExecutor(stage.steps, tasks=stage.tasks, workers=min(ex.workers, stage.tasks)
                                     if ex.workers > 0 else stage.tasks, logging_dir=stage.logging_dir,
                                     depends=depends)
    if ex.kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(stage.steps, tasks=stage.tasks, workers=ex.workers, logging_dir=stage.logging_dir,
                                   depends=depends, cpus_per_task=ex.ray_cpus_per_task)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    if not ex.slurm_partition:
        raise ValueError(f"{cfg.path}: executor.slurm_partition is required with kind = \"slurm\"")
    return SlurmPipelineExecutor(stage.steps, tasks=stage.tasks, time=ex.slurm_time, partition=ex.slurm_partition,
                                 cpus_per_task=ex.slurm_cpus_per_task, mem_per_cpu_gb=ex.slurm_mem_per_cpu_gb,
                                 workers=ex.workers, job_name=f"{cfg.name}-{stage.source}-{stage.name}",
                                 logging_dir=stage.logging_dir, depends=depends,
                                 sbatch_args=dict(ex.slurm_sbatch_args) or None)


def run_config(cfg: DataRunConfig, *, sources: list[str] | None = None, progress: bool = True) -> dict[str, str]:
    """Run the sources' stages (all, or those named); return ``{source: output_dir}``.

    Local and Ray runs finish here, stage after stage; Slurm stages are submitted as dependent
    jobs and this returns once they are queued. Raises when a task fails: re-running resumes.
    """
    import sys
    import time

    names = sources or list(cfg.sources)
    for name in names:
        if name not in cfg.sources:
            raise ValueError(f"{cfg.path}: no source named {name!r} (sources: {', '.join(cfg.sources)})")
    if cfg.executor.kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init()  # joins the cluster in RAY_ADDRESS if set, else starts a local one
    outputs = {}
    for name in names:
        stages = build_stages(cfg, cfg.sources[name])
        previous = None
        for stage in stages:
            t0 = time.perf_counter()
            executor = make_executor(cfg, stage, depends=previous if cfg.executor.kind == "slurm" else None)
            if cfg.executor.kind == "slurm":
                previous = executor
                continue
            if progress:
                print(f"data run: {name}/{stage.name}: {stage.tasks} task(s) on {cfg.executor.kind}",
                      file=sys.stderr, flush=True)
            executor.run()
            incomplete = executor.get_incomplete_ranks(skip_completed=True)
            if incomplete:
                raise RuntimeError(f"{name}/{stage.name}: tasks {incomplete} did not complete; see "
                                   f"{stage.logging_dir}/logs and re-run to resume")
            if progress:
                print(f"data run: {name}/{stage.name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if cfg.executor.kind == "slurm" and previous is not None:
            previous.run()
        outputs[name] = stages[-1].output_dir
    return outputs
