"""``precision = "auto"`` / ``--dtype auto``: bf16 exactly where the CPU multiplies it natively.

The expectation is read from ``/proc/cpuinfo`` (AVX512-BF16 or AMX-BF16 flags), not from torch's
own checks that the code uses, so a wrong check fails here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalab import precision
from llamalab.precision import resolve_dtype, resolve_precision


def _flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


NATIVE = bool(_flags() & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo to check against")
def test_auto_is_bf16_exactly_where_the_cpu_has_it() -> None:
    assert precision.native_bf16("cpu") is NATIVE
    assert resolve_precision("auto", "cpu") == ("bf16" if NATIVE else "fp32")
    assert resolve_dtype("auto") == (torch.bfloat16 if NATIVE else torch.float32)


def test_names_and_bad_values() -> None:
    assert resolve_precision("float32") == resolve_precision("fp32") == "fp32"
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="precision 'int3': expected one of auto, fp32"):
        resolve_precision("int3")


def test_explicit_bf16_without_native_bf16_works_and_warns_once(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="llamalab.precision"):
        assert resolve_precision("bf16", what="training") == "bf16"
        assert resolve_precision("bf16", what="training") == "bf16"
        assert resolve_precision("auto", what="training") == "fp32"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "~50x slower than fp32" in warnings[0] and "auto picks fp32" in warnings[0]


def test_native_bf16_never_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    monkeypatch.setattr(precision, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="llamalab.precision"):
        assert resolve_precision("auto") == resolve_precision("bf16") == "bf16"
    assert not caplog.records


def test_train_config_defaults_to_auto_and_the_shipped_cpu_recipe_uses_it() -> None:
    from llamalab.train.config import TrainSection, load_config

    assert TrainSection().precision == "auto"
    recipe = Path(__file__).parent.parent / "configs" / "pretrain" / "cpu-shakespeare.toml"
    assert load_config(recipe).train.precision == "auto"


def test_info_names_the_cpu_precision_and_kernel() -> None:
    """``llamalab info`` without a checkpoint: the machine, what auto picks, the kernel path in use."""
    from llamalab.generate import gemv

    out = subprocess.run([sys.executable, "-m", "llamalab.cli", "info", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["precision_auto"].startswith("bf16" if NATIVE else "fp32")
    assert info["decode_kernel"] == gemv.isa()
    for flag in ("avx2", "avx512f", "avx512_bf16"):
        assert (flag in info["cpu_features"].split()) == (flag in _flags())
