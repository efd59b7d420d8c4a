"""Suite-wide hygiene: no test leaves a process behind.

After every test, and after every module (its module-scoped fixtures torn down), the processes
started meanwhile that still run fail it, with their command lines, and are then killed. "Started
meanwhile" means a process that did not exist when the test (or module) began and that descends
from this pytest process or carries its marker in its environment (processes.MARKER): a child
orphaned by its parent's death is re-parented to init and is no longer a descendant.

Allowed to outlive a test:

- helpers that live as long as this interpreter and exit with it: Inductor's compile-worker pool
  (started by the first ``torch.compile``, shut down at exit) and the resource tracker and
  forkserver of multiprocessing / multiprocess (datatrove's pools);
- Ray's processes, until the end of the module: a module-scoped fixture may start a cluster whose
  workers come and go during its tests. The module check allows no Ray process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest
from processes import kill, ours

GRACE_S = 10.0  # processes being shut down (a killed child, ray.shutdown()) get this long to exit

_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocess.resource_tracker",
                        "multiprocessing.forkserver", "multiprocess.forkserver")


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _is_interpreter_helper(p: psutil.Process) -> bool:
    """A pool or tracker of this interpreter (a direct child; a compile worker's own workers too)."""
    me = os.getpid()
    try:
        chain = [p, *p.parents()]
    except psutil.NoSuchProcess:
        return True  # gone meanwhile
    for i, q in enumerate(chain):
        if q.pid == me:
            return False
        try:
            parent_is_me = q.ppid() == me
        except psutil.NoSuchProcess:
            return True
        cmd = " ".join(_cmdline(q))
        if parent_is_me and "torch/_inductor/compile_worker" in cmd:
            return True
        if i == 0 and parent_is_me and any(h in cmd for h in _INTERPRETER_HELPERS):
            return True
    return False


def _is_ray(p: psutil.Process) -> bool:
    cmd = _cmdline(p)
    return bool(cmd) and (cmd[0].startswith("ray::") or any("/site-packages/ray/" in a for a in cmd))


def _check(before: set[int], what: str, allow_ray: bool) -> None:
    def leaked() -> list[psutil.Process]:
        return [p for p in ours(set(psutil.pids()) - before)
                if not _is_interpreter_helper(p) and not (allow_ray and _is_ray(p))]

    left = leaked()
    deadline = time.monotonic() + GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leaked()
    if not left:
        return
    lines = [f"  pid {p.pid}: {' '.join(_cmdline(p))[:300]}" for p in left]
    survivors = kill(left)
    tail = f"\nstill running after SIGKILL: {[p.pid for p in survivors]}" if survivors else " (killed now)"
    pytest.fail(f"{what} left {len(left)} process(es) running{tail}:\n" + "\n".join(lines), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _no_process_left_by_the_module(request: pytest.FixtureRequest) -> Iterator[None]:
    before = set(psutil.pids())
    yield
    _check(before, f"module {request.module.__name__} (its tests and module fixtures)", allow_ray=False)


@pytest.fixture(autouse=True)
def _no_process_left_by_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set up after the module- and session-scoped fixtures, torn down after the test's own."""
    before = set(psutil.pids())
    yield
    _check(before, request.node.nodeid, allow_ray=True)
