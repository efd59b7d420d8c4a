"""Running untrusted (model-generated) Python programs, never in the evaluating process.

Each program runs in a fresh ``python -I`` interpreter, in a fresh temporary directory (its
working directory and ``HOME``), with stdin closed and a minimal environment, and is killed as a
whole after a wall-clock timeout. Inside the child, before the program's first line runs:

- resource limits: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_NPROC`` (fork bombs),
  ``RLIMIT_FSIZE`` (file and output size), ``RLIMIT_CORE`` 0, ``RLIMIT_NOFILE``;
- isolation, the strongest the machine allows (:func:`isolation` says which one is used):

  ``namespaces`` (util-linux ``unshare``: user, network, mount and PID namespaces). The network
  namespace has no interface up, so no connection can be made (not even to 127.0.0.1); every
  mount but the temporary directory is remounted read-only and ``/proc`` shows only the
  sandbox's processes; all capabilities are dropped (``no_new_privs``) before the interpreter
  that runs the program starts; ``RLIMIT_NPROC`` counts only the sandbox's processes (a user
  namespace has its own count, enforced even when the evaluator runs as root); killing the
  namespace's first process kills every process in it, even those that left the process group.

  ``guards`` (no usable ``unshare``, e.g. unprivileged user namespaces disabled): the same limits,
  and in-process guards installed before the program runs: socket creation, process creation
  and signals (``os.fork``, ``subprocess``, ``os.kill`` ...), and writes or deletions outside
  the temporary directory raise ``PermissionError``. These are speed bumps for mistakes, not a
  wall against a program written to escape (``ctypes`` goes around them).

A program *passed* only when it ran to its last line: the bootstrap reports success on a private
pipe with a random token the program is not given, so ``sys.exit(0)``/``os._exit(0)`` before the
checks, or an exception, count as failures. ``run_program`` never raises for what the program
does; the outcome is an :class:`ExecResult` (passed / failed / timeout / error, with a reason).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ExecResult", "isolation", "run_program", "run_programs"]

TAIL_CHARS = 2000
_PROGRAM_FILE = "program.py"

# Stage 1 runs (trusted) inside the new namespaces as the namespace's root: it remounts every
# mount read-only except the working directory, drops all capabilities and execs stage 2.
_STAGE1 = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
         "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
def mount(src, target, flags):
    if libc.mount(src, target.encode(), None, flags, None) != 0:
        raise OSError(ctypes.get_errno(), "mount " + target)
wd = os.getcwd()
mount(wd.encode(), wd, MS_BIND)  # its own mount, so that it stays writable
os.chdir(wd)  # the old cwd still points into the mount below, which becomes read-only
failed = []
with open("/proc/self/mountinfo") as f:
    lines = f.read().splitlines()
for line in lines:
    fields = line.split()
    target = fields[4].encode().decode("unicode_escape")
    if target == wd:
        continue
    # In a user namespace a remount must keep the mount's locked flags (nosuid, nodev, ...).
    keep = sum(FLAGS.get(o, 0) for o in fields[5].split(","))
    try:
        mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    except OSError as e:
        failed.append(target)
if "/" in failed:
    sys.stderr.write("sandbox: could not make / read-only\n")
    os._exit(97)
for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: root's exec below gets no capabilities
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    os._exit(97)
os.execv(sys.executable, [sys.executable, "-I", "-c", sys.argv[1]] + sys.argv[2:])
"""

# Stage 2 (trusted) sets the limits, installs the guards when there are no namespaces, reads the
# token, runs the program and reports on the result pipe.
_STAGE2 = r"""
import json, os, resource, sys
limits, guards, token_fd, result_fd = json.loads(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
with os.fdopen(token_fd, "r") as f:
    token = f.read()
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
report = os.fdopen(result_fd, "w")
main_pid = os.getpid()
def finish(status, reason):
    if os.getpid() != main_pid:  # a forked copy of the program: only the original reports
        os._exit(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    report.write(json.dumps({"token": token, "status": status, "reason": reason}))
    report.flush()
    os._exit(0)
if guards:
    exec(sys.argv[5], {"__name__": "_sandbox_guards"})
with open("program.py", encoding="utf-8") as f:
    source = f.read()
namespace = {"__name__": "__main__", "__file__": os.path.abspath("program.py"), "__builtins__": __builtins__}
sys.argv = ["program.py"]
try:
    code = compile(source, "program.py", "exec")
except (SyntaxError, ValueError) as e:
    finish("failed", f"{type(e).__name__}: {e}")
try:
    exec(code, namespace)
except SystemExit as e:
    finish("failed", f"the program called exit({e.code!r}) before its end")
except BaseException as e:
    import traceback
    traceback.print_exc()
    message = str(e).strip().splitlines()
    finish("failed", type(e).__name__ + (": " + message[0][:200] if message else ""))
finish("passed", "")
"""

# Installed only without namespaces, before the program runs (see the module docstring).
_GUARDS = r"""
import builtins, io, os, shutil, socket, subprocess
root = os.path.realpath(os.getcwd())
def refuse(what):
    def blocked(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")
    return blocked
class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("sandbox: network access is not allowed")
socket.socket = NoSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, name, refuse("network access"))
import _socket
_socket.socket = NoSocket
for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg",
             "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "setsid", "putenv", "chdir", "fchdir", "chroot"):
    if hasattr(os, name):
        setattr(os, name, refuse("os." + name))
subprocess.Popen = refuse("subprocess")
def inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fspath(path))
    return real == root or real.startswith(root + os.sep)
def confined(fn, what, write_check=None):
    def wrapper(path, *args, **kwargs):
        writing = write_check(args, kwargs) if write_check else True
        if writing and not inside(path):
            raise PermissionError(f"sandbox: {what} outside the working directory: {path!r}")
        return fn(path, *args, **kwargs)
    return wrapper
def open_writes(args, kwargs):
    mode = args[0] if args else kwargs.get("mode", "r")
    return any(c in str(mode) for c in "wax+")
def os_open_writes(args, kwargs):
    flags = args[0] if args else kwargs.get("flags", 0)
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
builtins.open = io.open = confined(io.open, "writing", open_writes)
os.open = confined(os.open, "writing", os_open_writes)
for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "renames", "replace",
             "truncate", "chmod", "chown", "link", "symlink", "utime"):
    setattr(os, name, confined(getattr(os, name), "os." + name))
shutil.rmtree = confined(shutil.rmtree, "shutil.rmtree")
shutil.move = confined(shutil.move, "shutil.move")
"""


@dataclass
class ExecResult:
    """What became of one program.

    ``status``: "passed" (ran to its last line), "failed" (an exception, a failed assert, an
    early exit, a limit hit), "timeout" (wall clock or CPU time) or "error" (the sandbox itself
    could not run it). ``reason`` says why in one line; the tails are the last characters of the
    program's output.
    """

    status: str
    reason: str
    returncode: int | None
    duration_s: float
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the program ran to its end without an exception."""
        return self.status == "passed"


def _unshare_command() -> list[str] | None:
    exe = shutil.which("unshare")
    if exe is None:
        return None
    return [exe, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
            "--mount-proc", "--"]


@lru_cache(maxsize=1)
def isolation() -> str:
    """The isolation this machine gives programs: "namespaces" or "guards" (see the module docstring).

    Decided once, by running a probe program that must find the network unreachable and ``/``
    read-only. ``LLAMALAB_SANDBOX=guards`` forces the fallback (to test it).
    """
    if os.environ.get("LLAMALAB_SANDBOX") == "guards" or sys.platform != "linux" or _unshare_command() is None:
        return "guards"
    probe = (
        "import socket, os\n"
        "s = socket.socket()\n"
        "try:\n    s.connect(('127.0.0.1', 9)); raise SystemExit('connected')\n"
        "except OSError as e:\n    assert 'unreachable' in str(e).lower(), e\n"
        "try:\n    open('/usr/.llamalab_probe', 'w'); raise SystemExit('wrote /usr')\n"
        "except OSError:\n    pass\n"
        "assert os.getpid() == 1 or os.getppid() in (0, 1)\n"
    )
    result = _run(probe, timeout_s=20.0, memory_mb=512, namespaces=True)
    return "namespaces" if result.passed else "guards"


def _limits(timeout_s: float, memory_mb: int, max_processes: int, max_file_mb: int) -> dict[str, int]:
    return {
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_CPU": int(timeout_s) + 1,
        "RLIMIT_NPROC": max_processes,
        "RLIMIT_FSIZE": max_file_mb * 2**20,
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": 64,
    }


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * TAIL_CHARS))
        return f.read().decode("utf-8", "replace")[-TAIL_CHARS:]


def _signal_reason(returncode: int) -> str:
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": "",
           "SIGSEGV": " (crash; often the memory limit)"}.get(name, "")
    return f"killed by {name}{why}"


def run_program(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_processes: int = 16,
                max_file_mb: int = 16) -> ExecResult:
    """Run the Python program ``code`` in the sandbox and say what became of it.

    ``timeout_s``: wall clock (the CPU limit is the same, rounded up); ``memory_mb``: address
    space; ``max_processes``: processes and threads (namespaces only; in the guarded fallback
    process creation is refused); ``max_file_mb``: largest file or output it may write.
    Never raises for what the program does.
    """
    if timeout_s <= 0 or memory_mb < 64 or max_processes < 1 or max_file_mb < 1:
        raise ValueError(f"run_program: timeout_s={timeout_s}, memory_mb={memory_mb}, max_processes="
                         f"{max_processes}, max_file_mb={max_file_mb}: expected > 0, >= 64, >= 1, >= 1")
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                max_file_mb=max_file_mb, namespaces=isolation() == "namespaces")


def _run(code: str, *, timeout_s: float, memory_mb: int, namespaces: bool, max_processes: int = 16,
         max_file_mb: int = 16) -> ExecResult:
    limits = _limits(timeout_s, memory_mb, max_processes, max_file_mb)
    token = secrets.token_hex(16)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llamalab_sandbox_") as tmp:
        work, logs = Path(tmp, "work"), Path(tmp, "logs")
        work.mkdir()
        logs.mkdir()
        (work / _PROGRAM_FILE).write_text(code, encoding="utf-8")
        token_r, token_w = os.pipe()
        result_r, result_w = os.pipe()
        stage2_args = [json.dumps(limits), "0" if namespaces else "1", str(token_r), str(result_w)]
        if namespaces:
            argv = _unshare_command() + [sys.executable, "-I", "-c", _STAGE1, _STAGE2] + stage2_args  # type: ignore[operator]
        else:
            argv = [sys.executable, "-I", "-c", _STAGE2] + stage2_args + [_GUARDS]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        try:
            with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
                try:
                    proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=err, pass_fds=(token_r, result_w), start_new_session=True)
                finally:
                    os.close(token_r)
                    os.close(result_w)
                os.write(token_w, token.encode())
                os.close(token_w)
                token_w = -1
                report = _Reader(result_r)
                try:
                    returncode: int | None = proc.wait(timeout=timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill(proc)
                    returncode = proc.wait()
                message = report.finish()
        except OSError as e:
            return ExecResult("error", f"could not run the sandbox: {e}", None, time.perf_counter() - start)
        finally:
            if token_w >= 0:
                os.close(token_w)
            os.close(result_r)
        duration = time.perf_counter() - start
        stdout, stderr = _tail(logs / "out"), _tail(logs / "err")
    if timed_out:
        return ExecResult("timeout", f"still running after {timeout_s:g} s (wall clock); killed", None,
                          duration, stdout, stderr)
    try:
        outcome = json.loads(message) if message else None
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict) or outcome.get("token") != token:
        outcome = None
    if returncode is not None and returncode < 0:
        status = "timeout" if -returncode == signal.SIGXCPU else "failed"
        return ExecResult(status, _signal_reason(returncode), returncode, duration, stdout, stderr)
    if outcome is None:
        if returncode == 97 and namespaces:
            return ExecResult("error", "the sandbox could not set up its namespaces: " + stderr.strip()[-200:],
                              returncode, duration, stdout, stderr)
        return ExecResult("failed", f"exited with code {returncode} before the end of the program", returncode,
                          duration, stdout, stderr)
    status = outcome.get("status")
    if status not in ("passed", "failed"):
        status = "failed"
    return ExecResult(status, str(outcome.get("reason", "")), returncode, duration, stdout, stderr)


class _Reader:
    """Drains the result pipe in a thread (a program flooding it must not block the evaluator)."""

    LIMIT = 1 << 16

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        size = 0
        while True:
            try:
                data = os.read(self.fd, 8192)
            except OSError:
                return
            if not data:
                return
            if size < self.LIMIT:
                self.chunks.append(data)
                size += len(data)

    def finish(self) -> str:
        """The text written to the pipe (once every writer has exited)."""
        self.thread.join(timeout=5.0)
        return b"".join(self.chunks).decode("utf-8", "replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group (with namespaces, its PID namespace dies with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def run_programs(programs: Sequence[str], *, workers: int | None = None, timeout_s: float = 10.0,
                 memory_mb: int = 1024, max_processes: int = 16,
                 on_done: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
    """Run many programs, at most ``workers`` at a time (default: the CPU count, at most 8).

    Results are in the order of ``programs``; ``on_done(index, result)`` is called as each ends
    (from a worker thread), e.g. to advance a progress bar.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"run_programs: workers={workers}: expected >= 1")
    isolation()  # probe once, before the threads start

    def one(i: int) -> ExecResult:
        result = run_program(programs[i], timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes)
        if on_done is not None:
            on_done(i, result)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(programs))))
