"""The model shapes of a sweep: "DIMxLAYERS" (or "DIMxLAYERSxHEADS") on the ``tiny`` preset.

A shape changes only the width and depth of the ``tiny`` preset (``llamalab.config``); the
vocabulary, context length, tied head, RoPE base and norm epsilon come from the sweep's run file.
Heads default to one per 32 dimensions (at least one), as wide as the queries, no grouping
(``n_kv_heads = n_heads``); the SwiGLU width follows Meta's rule with the preset's
``multiple_of = 32``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from llamalab.scaling.records import ScalingError

__all__ = ["DEFAULT_SIZES", "ModelShape", "parse_sizes"]

# Six shapes spanning ~17x in FLOPs per token on a 4K vocabulary (the head dominates the smallest);
# on Shakespeare they bracket the compute-optimal size from ~1e12 to ~1e13 FLOPs (docs/scaling.md).
DEFAULT_SIZES = "16x1,32x1,48x1,64x2,96x2,128x3"

_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class ModelShape:
    """Width, depth and heads of one model of the ladder; ``name`` as written ("64x2")."""

    name: str
    dim: int
    n_layers: int
    n_heads: int

    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields this shape sets on the ``tiny`` preset."""
        return {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_heads}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``sizes`` entries of sweep.json)."""
        return {**asdict(self), "n_kv_heads": self.n_heads}


def parse_shape(text: str) -> ModelShape:
    """"64x2" -> dim 64, 2 layers, 2 heads; "64x2x4" -> 4 heads. ScalingError for anything else."""
    m = _SHAPE.match(text.strip())
    if not m:
        raise ScalingError(f"--sizes: {text!r}: expected DIMxLAYERS or DIMxLAYERSxHEADS, e.g. 64x2 or 64x2x4")
    dim, layers = int(m.group(1)), int(m.group(2))
    heads = int(m.group(3)) if m.group(3) else max(1, dim // 32)
    if dim < 2 or layers < 1 or heads < 1:
        raise ScalingError(f"--sizes: {text!r}: dim, layers and heads must be positive (dim >= 2)")
    if dim % heads or (dim // heads) % 2:
        raise ScalingError(f"--sizes: {text!r}: dim {dim} must split into {heads} heads of an even width "
                           f"(give the heads: DIMxLAYERSxHEADS)")
    return ModelShape(text.strip(), dim, layers, heads)


def parse_sizes(text: str) -> list[ModelShape]:
    """A comma-separated list of shapes; duplicates and an empty list are errors."""
    shapes = [parse_shape(t) for t in text.split(",") if t.strip()]
    if not shapes:
        raise ScalingError("--sizes: empty; expected shapes such as 32x1,64x2,96x3")
    names = [s.name for s in shapes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ScalingError(f"--sizes: {dup!r} is listed twice")
    return shapes
