"""llamalab: the LLaMA system end to end in one readable PyTorch codebase.

``llamalab.load(source)`` reads any supported checkpoint and returns a ready model and tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llamalab.api import LoadedModel, load


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import llamalab` (and `llamalab --help`) does not pull in torch.
    if name in ("load", "LoadedModel"):
        from llamalab import api

        return getattr(api, name)
    raise AttributeError(f"module 'llamalab' has no attribute {name!r}")


__all__ = ["LoadedModel", "__version__", "load"]
