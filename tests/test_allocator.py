"""``reuse_freed_memory``: a freed large block is reused without new page faults (the kernel's own
count, ``getrusage``), where glibc's default maps and unmaps it every time."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
if sys.argv[1] == "reuse":
    from llamalab.allocator import reuse_freed_memory
    assert reuse_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = torch.ones(16 * 1024 * 1024)  # 64 MB, written: every page touched
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the heap grows to its working size first
    faults_of_one_round()
print(faults_of_one_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = 5 * 64 * 1024 * 1024 // 4096
    assert faults("default") > pages // 2  # each 64 MB tensor is a fresh mapping
    assert faults("reuse") < pages // 20   # the same memory again, already mapped
