"""The processes a test started: found (also once orphaned), and killed with their process group.

Used by conftest.py's leak check and by the tests that SIGKILL a command-line run on purpose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import psutil

# Every process this pytest process starts inherits this variable, so that a process orphaned by
# its parent's death (re-parented to init, no longer a descendant) is still recognised as ours.
MARKER = "LLAMALAB_TEST_SESSION"
os.environ[MARKER] = f"{os.getpid()}-{uuid.uuid4().hex}"


def ours(pids: set[int] | None = None) -> list[psutil.Process]:
    """The live processes among ``pids`` (default: all) that descend from this process or carry its marker."""
    me, marker = os.getpid(), os.environ[MARKER]
    found = []
    for pid in psutil.pids() if pids is None else pids:
        if pid == me:
            continue
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:  # dead; its parent (or init) reaps it
                continue
            if any(a.pid == me for a in p.parents()) or p.environ().get(MARKER) == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has exited: it only waits to be reaped)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


def kill(procs: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL ``procs`` and their descendants, reap those that are our children; the survivors."""
    everything = {p.pid: p for p in procs}
    for p in procs:
        try:
            everything.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in everything.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return wait_dead(list(everything.values()), timeout)


def wait_dead(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of ``procs`` runs (reaping our own children); the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            try:
                if p.ppid() == os.getpid():
                    os.waitpid(p.pid, os.WNOHANG)
            except (psutil.NoSuchProcess, ChildProcessError):
                pass
        left = alive(procs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def kill_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the whole process group of ``proc`` (started with ``start_new_session=True``), as a
    crash or a scheduler's kill would, reap ``proc`` and wait until no process of the group runs.

    Killing only ``proc`` orphans its children (a multiprocessing manager, pool workers): they
    would keep running after the test, and keep writing into the run it is about to resume."""
    if proc.poll() is None:
        assert os.getpgid(proc.pid) == proc.pid, "start the process with start_new_session=True"
    group = [p for p in ours() if _pgid(p.pid) == proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has exited already
        pass
    proc.wait(timeout)
    left = wait_dead(group, timeout)
    assert not left, f"process group {proc.pid} still running after SIGKILL: {[p.pid for p in left]}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
