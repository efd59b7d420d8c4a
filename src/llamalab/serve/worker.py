"""One generation at a time, in arrival order, on a thread beside the event loop.

Why a single worker: generation is CPU-bound and the model holds one KV cache, so two
generations at once would only split the same cores (each finishing later) and would need a
cache per request. A FIFO queue in front of one thread keeps every request's state its own,
answers in arrival order, and leaves the asyncio event loop free to accept connections, answer
``/health`` and notice disconnects while a generation runs (PyTorch releases the GIL inside its
kernels).

The event loop talks to the worker through a :class:`Job`: the worker pushes events (text
pieces, then the results, or an error) into the job's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``; the loop asks the worker to stop by setting ``job.cancelled``,
which the worker checks before starting a job and between streamed pieces (stopping = pulling
no further piece and closing the stream generator, which frees the model's cache).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "GenerationWorker"]

log = logging.getLogger("llamalab.serve")

# Event kinds a job's queue receives, in this order: PIECE* then (DONE | ERROR | CANCELLED).
PIECE, DONE, ERROR, CANCELLED = "piece", "done", "error", "cancelled"


@dataclass
class Job:
    """One request's generation: ``stream`` jobs have one prompt and emit pieces as they come.

    ``prompts``/``config`` are handed to ``Generator.generate`` (or ``Generator.stream`` for a
    single prompt). ``events`` lives on ``loop``; only the worker thread puts into it.
    """

    prompts: list[list[int]]
    config: Any  # llamalab.generate.GenerationConfig
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the event loop (from the worker thread); dropped if the loop has closed."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # loop closed: nobody is listening any more
            pass


class GenerationWorker:
    """A daemon thread running :class:`Job` s one at a time, first come first served."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.busy = False
        self.completed = 0  # jobs run (to the end, or stopped by their client)
        self.skipped = 0  # jobs dropped unstarted: their client had gone

    @property
    def waiting(self) -> int:
        """Jobs queued behind the one running."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llamalab-generate", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the running job, cancel the queued ones, and end the thread."""
        pending: list[Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            job.cancelled.set()
            job.emit(CANCELLED)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events arrive on ``job.events``."""
        self.start()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.skipped += 1
                job.emit(CANCELLED)
                continue
            self.busy = True
            try:
                self._execute(job)
            except Exception as e:  # noqa: BLE001 - reported to the request, the worker lives on
                log.exception("generation failed")
                job.emit(ERROR, e)
            finally:
                self.busy = False
                self.completed += 1

    def _execute(self, job: Job) -> None:
        gen = self.generator
        if not job.stream:
            job.emit(DONE, gen.generate(job.prompts, job.config))
            return
        (prompt,) = job.prompts
        pieces = gen.stream(prompt, job.config)
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    break
                if piece:
                    job.emit(PIECE, piece)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        if job.cancelled.is_set():
            job.emit(CANCELLED)
        else:
            job.emit(DONE, [gen.last_result])
