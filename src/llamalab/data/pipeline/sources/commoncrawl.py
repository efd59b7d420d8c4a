"""CommonCrawl's entry in the source registry: the CCNet steps live in `llamalab.data.pipeline.commoncrawl`."""

from __future__ import annotations

from llamalab.data.pipeline.commoncrawl import DEFAULTS, build_steps

__all__ = ["DEFAULTS", "build_steps"]
