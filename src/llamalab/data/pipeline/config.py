"""The TOML description of a data run (``configs/data/*.toml``) as dataclasses.

::

    name = "demo"
    run_dir = "runs/data/demo"          # RUN_DIR: outputs, rejects, logs, shards

    [executor]
    kind = "local"                      # local | ray | slurm
    tasks = 4                           # tasks per source stage (input files are split among them)
    workers = 2                         # local: tasks at once (-1: all)

    [sources.web]
    type = "commoncrawl"                # commoncrawl c4 github wikipedia books arxiv stackexchange
    inputs = ["data/cc/*.warc.wet.gz"]  # files, directories or globs (relative to the working dir)
    [sources.web.options]               # the source's thresholds (see its DEFAULTS)
    languages = ["en"]

    [mixture]
    tokenizer = "tok/llama.model"
    seed = 0
    [mixture.weights]                   # sampling proportions (default: LLaMA's, by source type)
    web = 0.67
    [mixture.epochs]                    # passes over each source (default: LLaMA's, by source type)
    web = 1.10

Every table rejects keys it does not know, naming the file and the key. Source options are
checked against the source module's ``DEFAULTS`` when the pipeline is built.
"""

from __future__ import annotations

import glob
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .sources import SOURCE_TYPES

__all__ = [
    "EXECUTORS",
    "LLAMA1_EPOCHS",
    "DataRunConfig",
    "ExecutorConfig",
    "MixtureConfig",
    "SourceConfig",
    "expand_inputs",
    "load_config",
]

EXECUTORS = ("local", "ray", "slurm")

# LLaMA 1 (Touvron et al. 2023, Table 1): epochs over each source's processed data.
LLAMA1_EPOCHS: dict[str, float] = {
    "commoncrawl": 1.10,
    "c4": 1.06,
    "github": 0.64,
    "wikipedia": 2.45,
    "books": 2.23,
    "arxiv": 1.06,
    "stackexchange": 1.03,
}


@dataclass
class ExecutorConfig:
    """Where the stages run: datatrove's local (processes), Ray or Slurm executor."""

    kind: str = "local"
    tasks: int = 4  # tasks per source stage
    workers: int = -1  # local: tasks running at once (-1: all); ray/slurm: concurrent tasks cap
    dedup_tasks: int = 1  # tasks of the global exact-dedup stage (each reads every document)
    ray_cpus_per_task: int = 1
    slurm_partition: str = ""
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_sbatch_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One source: its type, its raw inputs and its options (thresholds)."""

    name: str
    type: str
    inputs: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    tasks: int | None = None  # overrides executor.tasks for this source
    exact_dedup: bool = True  # the global exact-dedup stage after the source's steps


@dataclass
class MixtureConfig:
    """Sampling the processed sources into token shards."""

    tokenizer: str | None = None  # no tokenizer: the pipeline stops at the JSONL outputs
    seed: int = 0
    weights: dict[str, float] = field(default_factory=dict)  # by source name; default LLaMA's by type
    epochs: dict[str, float] = field(default_factory=dict)  # by source name; default LLaMA's by type
    total_tokens: int | None = None  # set: epochs follow from weights x total_tokens / source size
    shard_tokens: int = 100_000_000
    num_workers: int = 0  # tokenizer processes


@dataclass
class DataRunConfig:
    """A whole data run: executor, sources, mixture, and where everything is written."""

    name: str
    run_dir: str
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    rejects: bool = True  # write dropped documents with their reason under RUN_DIR/rejects
    path: str = ""  # the TOML file this came from (for messages)

    def source_dir(self, name: str) -> str:
        """``RUN_DIR/<source>``: the source's outputs (``output/``), intermediate stages and logs."""
        return os.path.join(self.run_dir, name)

    def rejects_dir(self) -> str | None:
        """``RUN_DIR/rejects`` when rejects are kept, else None."""
        return os.path.join(self.run_dir, "rejects") if self.rejects else None

    def weight(self, name: str) -> float:
        """The mixture proportion of a source (the user's, else LLaMA's for its type)."""
        from llamalab.data.loader import LLAMA1_MIXTURE

        return float(self.mixture.weights.get(name, LLAMA1_MIXTURE[self.sources[name].type]))

    def epochs(self, name: str) -> float:
        """The epochs over a source (the user's, else LLaMA's for its type)."""
        return float(self.mixture.epochs.get(name, LLAMA1_EPOCHS[self.sources[name].type]))


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field's annotation (ints count as floats; bools are not ints)."""
    args = typing.get_args(hint)
    if args and type(None) in args:  # X | None
        return value is None or any(_type_ok(value, a) for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _fill(cls: type, table: dict[str, Any], where: str, path: str, **extra: Any) -> Any:
    """``cls(**table, **extra)`` after checking that every key is a field and every value has its type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)} - set(extra) - {"path"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key {where}{unknown[0]}; expected one of {', '.join(sorted(known))}")
    for key, value in table.items():
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{path}: {where}{key} = {value!r}: expected {getattr(hints[key], '__name__', hints[key])}")
    return cls(**table, **extra)


def _number_table(table: Any, where: str, path: str, names: dict[str, Any]) -> dict[str, float]:
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {where}: expected a table of source name = number")
    out = {}
    for key, value in table.items():
        if key not in names:
            raise ValueError(f"{path}: {where}.{key}: no source named {key!r} (sources: {', '.join(names)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{path}: {where}.{key} = {value!r}: expected a non-negative number")
        out[key] = float(value)
    return out


def load_config(path: str | os.PathLike[str]) -> DataRunConfig:
    """Read and check a data-run TOML file; errors are ValueErrors naming the file and key."""
    path = str(path)
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    return config_from_dict(raw, path)


def config_from_dict(raw: dict[str, Any], path: str = "<config>") -> DataRunConfig:
    """Build a `DataRunConfig` from a parsed TOML table (``path`` names it in errors)."""
    raw = dict(raw)
    top = {"name", "run_dir", "executor", "sources", "mixture", "rejects"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(top))}")
    name = raw.get("name") or Path(path).stem
    if "run_dir" not in raw:
        raise ValueError(f"{path}: missing key 'run_dir' (the directory every output goes to)")
    executor = _fill(ExecutorConfig, dict(raw.get("executor", {})), "executor.", path)
    if executor.kind not in EXECUTORS:
        raise ValueError(f"{path}: executor.kind = {executor.kind!r}: expected one of {', '.join(EXECUTORS)}")
    if executor.tasks < 1 or executor.dedup_tasks < 1:
        raise ValueError(f"{path}: executor.tasks and executor.dedup_tasks: expected positive integers")

    sources: dict[str, SourceConfig] = {}
    raw_sources = raw.get("sources", {})
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise ValueError(f"{path}: expected at least one [sources.<name>] table")
    for sname, table in raw_sources.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: sources.{sname}: expected a table")
        table = dict(table)
        for key in ("type", "inputs"):
            if key not in table:
                raise ValueError(f"{path}: sources.{sname}: missing key {key!r}")
        if table["type"] not in SOURCE_TYPES:
            raise ValueError(f"{path}: sources.{sname}.type = {table['type']!r}: expected one of "
                             f"{', '.join(SOURCE_TYPES)}")
        if isinstance(table["inputs"], str):
            table["inputs"] = [table["inputs"]]
        if not isinstance(table["inputs"], list) or not all(isinstance(i, str) for i in table["inputs"]):
            raise ValueError(f"{path}: sources.{sname}.inputs: expected a path or a list of paths")
        if not isinstance(table.get("options", {}), dict):
            raise ValueError(f"{path}: sources.{sname}.options: expected a table")
        src = _fill(SourceConfig, table, f"sources.{sname}.", path, name=sname)
        if src.tasks is not None and src.tasks < 1:
            raise ValueError(f"{path}: sources.{sname}.tasks = {src.tasks}: expected a positive integer")
        sources[sname] = src

    mix = dict(raw.get("mixture", {}))
    weights = _number_table(mix.pop("weights", {}), "mixture.weights", path, sources)
    epochs = _number_table(mix.pop("epochs", {}), "mixture.epochs", path, sources)
    mixture = _fill(MixtureConfig, mix, "mixture.", path, weights=weights, epochs=epochs)
    if mixture.total_tokens is not None and (not isinstance(mixture.total_tokens, int) or mixture.total_tokens <= 0):
        raise ValueError(f"{path}: mixture.total_tokens = {mixture.total_tokens!r}: expected a positive integer")
    rejects = raw.get("rejects", True)
    if not isinstance(rejects, bool):
        raise ValueError(f"{path}: rejects = {rejects!r}: expected true or false")
    return DataRunConfig(name=str(name), run_dir=str(raw["run_dir"]), executor=executor, sources=sources,
                         mixture=mixture, rejects=rejects, path=path)


def expand_inputs(inputs: list[str], where: str) -> list[str]:
    """Files, directories and glob patterns -> the existing paths, sorted; nothing found is an error."""
    out: list[str] = []
    for item in inputs:
        item = os.path.expanduser(item)
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise FileNotFoundError(f"{where}: input {item!r} matches no file")
        out.extend(matches)
    return out
