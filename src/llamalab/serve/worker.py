"""Generation on a thread beside the event loop: requests decoded together, or one at a time.

:class:`BatchingWorker` (what ``llamalab serve`` runs) hands every request to a
:class:`~llamalab.generate.batching.ContinuousBatcher`: requests join the running decode batch at
the next token boundary and leave it as soon as they finish, so N clients share each read of the
weights instead of waiting for one another. :class:`GenerationWorker` runs one request at a time
in arrival order, for generators that are not a llamalab model (anything with ``generate``,
``stream`` and ``last_result``). Either way one thread does the work: generation is CPU-bound,
and the thread leaves the asyncio event loop free to accept connections, answer ``/health`` and
notice disconnects while a step runs (PyTorch releases the GIL inside its kernels).

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
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Job", "Piece", "GenerationWorker", "BatchingWorker"]

log = logging.getLogger("llamalab.serve")

# Event kinds a job's queue receives, in this order: PIECE* then (DONE | ERROR | CANCELLED).
PIECE, DONE, ERROR, CANCELLED = "piece", "done", "error", "cancelled"


@dataclass(frozen=True)
class Piece:
    """A PIECE event's payload: the text that became safe to show, and (from the batching worker,
    when the request asked for logprobs) the ids generated since the previous piece with their
    log-probs, so that a streamed answer can report each token's logprob with the chunk that
    first shows it."""

    text: str
    ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None


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
    # Other work on the model (embeddings): run on the worker thread between steps, its result DONE.
    call: Any = None

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the event loop (from the worker thread); dropped if the loop has closed."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # loop closed: nobody is listening any more
            pass


def _threads_here() -> int:
    import torch

    return torch.get_num_threads()


def _use_threads(n: int) -> None:
    """``n`` threads for the model on the calling thread (torch's count is per thread: see
    ``llamalab serve``, which keeps its own thread at 1)."""
    import torch

    torch.set_num_threads(n)


class GenerationWorker:
    """A daemon thread running :class:`Job` s one at a time, first come first served."""

    def __init__(self, generator: Any, *, threads: int | None = None) -> None:
        self.generator = generator
        self.threads = threads or _threads_here()  # the model's, on this worker's thread
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
        for job in _drain(self._queue):
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
        _use_threads(self.threads)
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
        if job.call is not None:
            job.emit(DONE, job.call())
            return
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
                    job.emit(PIECE, Piece(piece))
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        if job.cancelled.is_set():
            job.emit(CANCELLED)
        else:
            job.emit(DONE, [gen.last_result])


class BatchingWorker:
    """A daemon thread stepping a :class:`~llamalab.generate.batching.ContinuousBatcher` over the
    :class:`Job` s submitted: each job's prompts are sequences of the batch (``n`` completions are
    ``n`` rows), a job's events as :class:`GenerationWorker` sends them.

    ``max_batch``: rows decoded together (llama.cpp's parallel slots); ``max_seq_len``: positions
    per row (prompt + answer), default the model's context; ``max_prefill_tokens``: prompt tokens
    prefilled in one step at most (the batcher's). ``on_step(batch_size, seconds)``
    and ``on_finish(request)`` (optional) see every step and every finished sequence (metrics).

    ``burst_gap``: after an idle spell, the first request is held while more keep arriving, each
    within this many seconds of the last (at most ``max_batch`` of them, and ``4 * burst_gap`` in
    all), so that clients that send at once are prefilled together in one step instead of the
    first alone and the rest a prefill later (0: no wait).
    """

    def __init__(self, generator: Any, *, max_batch: int = 4, max_seq_len: int | None = None,
                 max_prefill_tokens: int = 4096, on_step: Any = None, on_finish: Any = None, threads: int | None = None,
                 burst_gap: float = 0.002) -> None:
        from llamalab.generate.batching import ContinuousBatcher

        if not burst_gap >= 0:
            raise ValueError(f"BatchingWorker: burst_gap={burst_gap!r} must be >= 0 seconds (0: no wait)")
        self.generator = generator
        self.threads = threads or _threads_here()  # the model's, on this worker's thread
        self.batcher = ContinuousBatcher(generator, max_batch=max_batch, max_seq_len=max_seq_len,
                                         max_prefill_tokens=max_prefill_tokens)
        self.max_seq_len = self.batcher.max_seq_len
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active: dict[int, tuple[Job, list[Any]]] = {}  # id(job) -> (job, its BatchRequests)
        self.on_step, self.on_finish = on_step, on_finish
        self.burst_gap = burst_gap
        self.completed = 0
        self.skipped = 0
        self._taking = False

    @property
    def busy(self) -> bool:
        """Whether jobs are in hand (being taken in, waiting in the batch, or decoded)."""
        return self._taking or bool(self._active) or self.batcher.has_work()

    @property
    def waiting(self) -> int:
        """Requests not yet in the batch."""
        return self._queue.qsize() + self.batcher.waiting

    @property
    def running(self) -> int:
        """Sequences in the batch."""
        return self.batcher.running

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llamalab-batch", daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events arrive on ``job.events``."""
        self.start()
        self._queue.put(job)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel what is queued and running, and end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        _use_threads(self.threads)
        stopping = False
        while not stopping:
            idle = not self.batcher.has_work()
            try:
                job = self._queue.get(timeout=None if idle else 0)
            except queue.Empty:
                job = _NO_JOB
            self._taking = True
            # A burst after an idle spell is gathered (see burst_gap); otherwise what is queued now.
            taken, until = 0, time.perf_counter() + 4 * self.burst_gap
            while job is not _NO_JOB:
                if job is None:
                    stopping = True
                else:
                    self._take(job)
                    taken += 1
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    left = until - time.perf_counter()
                    if not idle or stopping or taken >= self.batcher.max_batch or left <= 0:
                        job = _NO_JOB
                    else:
                        try:
                            job = self._queue.get(timeout=min(self.burst_gap, left))
                        except queue.Empty:
                            job = _NO_JOB
            self._taking = False
            for job, requests in list(self._active.values()):
                if job.cancelled.is_set():
                    for r in requests:
                        r.cancel()
            if stopping:
                break
            if self.batcher.has_work():
                t0 = time.perf_counter()
                try:
                    batch = self.batcher.step()
                except Exception as e:  # noqa: BLE001 - reported to the requests, the worker lives on
                    log.exception("a batched generation step failed")
                    self._fail_all(e)
                    continue
                if self.on_step is not None and batch:
                    self.on_step(batch, time.perf_counter() - t0)
        self._fail_all(None)

    def _take(self, job: Job) -> None:
        """Put a job's prompts into the batch (or answer it at once: gone, or bad input)."""
        if job.cancelled.is_set():
            self.skipped += 1
            job.emit(CANCELLED)
            return
        if job.call is not None:  # between two steps: the batch's cache is out of the model
            try:
                job.emit(DONE, job.call())
            except Exception as e:  # noqa: BLE001 - reported to the request
                log.exception("a call on the worker failed")
                job.emit(ERROR, e)
            self.completed += 1
            return
        requests: list[Any] = []
        self._active[id(job)] = (job, requests)
        seed = job.config.seed
        try:
            for k, prompt in enumerate(job.prompts):
                # Each row its own seeded draws (seed, seed + 1, ...): rows change places in the batch
                # as others finish, so a shared generator would draw in an order that depends on them.
                g = None if seed is None else self.generator._torch_generator((seed + k) % 2**63)
                requests.append(self.batcher.submit(
                    prompt, job.config, generator=g, on_token=self._on_token(job) if job.stream else None,
                    on_done=self._on_done(job)))
        except ValueError as e:
            del self._active[id(job)]
            for r in requests:
                r.on_done = None
                r.cancel()
            job.emit(ERROR, e)

    @staticmethod
    def _on_token(job: Job) -> Any:
        sent = [0]  # ids already handed out with a piece

        def emit(r: Any) -> None:
            piece = r.seq.new_text()
            if not piece:
                return
            lps = r.seq.logprobs
            if lps is None:
                job.emit(PIECE, Piece(piece))
                return
            n = len(r.seq.ids)
            job.emit(PIECE, Piece(piece, tuple(r.seq.ids[sent[0]:n]), tuple(lps[sent[0]:n])))
            sent[0] = n
        return emit

    def _on_done(self, job: Job) -> Any:
        def done(r: Any) -> None:
            if self.on_finish is not None and r.result is not None:
                self.on_finish(r)
            entry = self._active.get(id(job))
            if entry is None or not all(q.finished for q in entry[1]) or len(entry[1]) < len(job.prompts):
                return
            del self._active[id(job)]
            if all(q.first_token_at is None for q in entry[1]):  # cancelled before it got a row
                self.skipped += 1
            else:
                self.completed += 1
            if job.cancelled.is_set() or any(q.result is None for q in entry[1]):
                job.emit(CANCELLED)
            else:
                job.emit(DONE, [q.result for q in entry[1]])
        return done

    def _fail_all(self, error: Exception | None) -> None:
        """End every job in flight: with ``error``, or cancelled (``None``: the worker stops)."""
        entries, self._active = list(self._active.values()), {}
        for job, requests in entries:
            for r in requests:
                r.on_done = None
            job.emit(ERROR, error) if error is not None else job.emit(CANCELLED)
        self.batcher.close()
        for job in _drain(self._queue):
            job.emit(CANCELLED)


_NO_JOB = object()


def _drain(q: queue.Queue) -> list[Job]:
    """Everything queued now (the stop markers left out)."""
    out = []
    while True:
        try:
            job = q.get_nowait()
        except queue.Empty:
            return out
        if job is not None:
            out.append(job)
