"""The same small pipeline on datatrove's local executor and on a local Ray instance: identical files."""

from __future__ import annotations

import pytest
import ray
from test_data_pipeline import _config, _inputs, _outputs

from llamalab.data.pipeline.config import config_from_dict
from llamalab.data.pipeline.engine import run_config


@pytest.mark.slow
def test_ray_executor_gives_the_local_output(tmp_path):
    _inputs(tmp_path)
    run_config(config_from_dict(_config(tmp_path, "local", workers=2, dedup_tasks=2)), progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        run_config(config_from_dict(_config(tmp_path, "ray", kind="ray", workers=2, dedup_tasks=2)), progress=False)
    finally:
        ray.shutdown()
    local = _outputs(tmp_path / "local")
    assert local and _outputs(tmp_path / "ray") == local
    assert len(local) == 2  # two dedup partitions, each a file
