"""Llama 3's scaling-law method (Dubey et al. 2024, §3.2.1): IsoFLOPs sweeps and their fits.

``llamalab scaling sweep`` trains a ladder of model sizes at each compute budget with the
project's own training loop (``sweep.py``); ``llamalab scaling fit`` fits the IsoFLOPs
parabolas, the power law of compute-optimal tokens against compute, and the downstream
NLL -> accuracy sigmoid (``fit.py``) and draws the paper's figures 2, 3 and 4 (``plot.py``).
The modules: ``records.py`` (sweep.json and the error type), ``sizes.py`` (model shapes),
``downstream.py`` (a multiple-choice task's NLL and accuracy through ``llamalab.eval``),
``cli.py`` (the parsers; nothing heavy imported at import time). See docs/scaling.md.
"""

from llamalab.scaling.records import ScalingError

__all__ = ["ScalingError"]
