"""OpenAI-compatible HTTP server: ``create_app(loaded_model, model_name)`` and ``llamalab serve``.

``create_app`` needs the ``serve`` extra (fastapi, uvicorn); it is imported on first use so that
``add_serve_parser`` (wired into ``llamalab``'s CLI) costs nothing when the command is not run.
"""

from __future__ import annotations

from typing import Any

from llamalab.serve.cli import add_serve_parser

__all__ = ["add_serve_parser", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llamalab.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'llamalab.serve' has no attribute {name!r}")
