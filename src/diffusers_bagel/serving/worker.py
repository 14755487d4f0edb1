"""
The worker thread of the BAGEL server: it owns the pipeline, takes jobs from a bounded queue in arrival order, and
runs the jobs that share a batching key as one call. The queue is bounded in jobs and in the bytes they hold; a job
whose client went away or whose time ran out is dropped before it runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from diffusers.utils import logging

from .metrics import ServerMetrics


logger = logging.get_logger(__name__)

__all__ = ["Job", "BatchWorker", "QueueFullError"]


class QueueFullError(RuntimeError):
    """The queue holds `max_queue` jobs, or `max_queue_bytes` bytes, already; the request is refused (HTTP 429)."""


@dataclass(eq=False)
class Job:
    """
    One request's work for the worker.

    Args:
        kind (`str`): `"generate"`, `"edit"` or `"chat"`.
        key (`Hashable`, *optional*): jobs with equal keys may run as one call; `None` runs the job alone.
        weight (`int`): how much of `max_batch_size` the job takes (its number of images).
        payload (`Any`): what the executor needs (validated inputs).
        nbytes (`int`, defaults to 0): bytes the payload holds while it waits (counted against `max_queue_bytes`).
        timeout (`float`, *optional*): seconds after its creation past which the job is dropped unrun.
    """

    kind: str
    key: Hashable | None
    weight: int
    payload: Any
    nbytes: int = 0
    timeout: float | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    batch_size: int = 1
    cancelled: bool = False
    cancel_reason: str | None = None

    @property
    def queue_time(self) -> float:
        """Seconds between submission and the start of the job's call (so far, if it has not started)."""
        return (self.started_at or time.perf_counter()) - self.enqueued_at

    def cancel(self, reason: str) -> None:
        """Marks the job as no longer wanted (`"disconnected"`, `"timeout"`): dropped if it still waits; a running
        call may stop early (see the executor)."""
        if not self.cancelled:
            self.cancel_reason = reason
            self.cancelled = True

    def expired(self, now: float | None = None) -> bool:
        """Whether the job was cancelled or its `timeout` has passed."""
        if self.cancelled:
            return True
        return self.timeout is not None and (now or time.perf_counter()) - self.enqueued_at > self.timeout


class BatchWorker:
    """
    A single thread that runs `execute(jobs) -> list[result | Exception]` (one entry per job, in order) on batches of
    queued jobs. The first waiting job starts a batch; later waiting jobs with the same `key` join it while the sum of
    their weights stays within `max_batch_size` (a job heavier than that still runs, alone). When the call itself
    raises for a batch of several jobs, each job is run again alone, so one bad request cannot fail the others.
    Cancelled or expired jobs are dropped (their futures cancelled) wherever the worker meets them before the call.

    Args:
        execute (`Callable`): runs a batch; called only from the worker thread.
        max_batch_size (`int`): largest total weight of one batch (1 disables batching).
        max_queue (`int`): jobs allowed to wait; [`~BatchWorker.submit`] raises [`QueueFullError`] beyond it.
        metrics ([`ServerMetrics`]): receives queue times and batch sizes.
        batch_wait (`float`, defaults to 0.01): seconds the worker waits for companions of a batchable job when
            the queue holds fewer than a full batch (0: take what is there).
        max_queue_bytes (`int`, *optional*): most bytes (`Job.nbytes`) the waiting jobs may hold together;
            [`~BatchWorker.submit`] raises [`QueueFullError`] beyond it (a job alone in the queue is always taken).
    """

    def __init__(
        self,
        execute: Callable[[list[Job]], list],
        max_batch_size: int,
        max_queue: int,
        metrics: ServerMetrics,
        batch_wait: float = 0.01,
        max_queue_bytes: int | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"`max_batch_size` and `max_queue` must be >= 1, got {max_batch_size}, {max_queue}.")
        if max_queue_bytes is not None and max_queue_bytes < 1:
            raise ValueError(f"`max_queue_bytes` must be >= 1, got {max_queue_bytes}.")
        self.execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.metrics = metrics
        self.batch_wait = batch_wait
        self._queue: deque[Job] = deque()
        self._queued_bytes = 0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        metrics.queue_depth = self.depth
        metrics.queue_bytes = self.queued_bytes

    def depth(self) -> int:
        """Jobs waiting (not the running batch)."""
        return len(self._queue)

    def queued_bytes(self) -> int:
        """Bytes held by the waiting jobs (the sum of their `nbytes`)."""
        return self._queued_bytes

    def start(self) -> None:
        """Starts the worker thread (once; later calls do nothing)."""
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="bagel-serve-worker", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Lets the worker finish the waiting jobs, then stops it."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Future:
        """Queues `job` and returns its future. Raises [`QueueFullError`] when `max_queue` jobs wait already, or when
        the waiting jobs and this one would hold more than `max_queue_bytes`."""
        self.start()
        with self._condition:
            if self._closed:
                raise RuntimeError("The server is shutting down.")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"The server's queue is full ({self.max_queue} requests wait); retry later.")
            budget = self.max_queue_bytes
            if budget is not None and self._queue and self._queued_bytes + job.nbytes > budget:
                raise QueueFullError(f"The server's queue holds as many bytes of input as it allows ({budget}); "
                                     "retry later.")  # fmt: skip
            self._queue.append(job)
            self._queued_bytes += job.nbytes
            self._condition.notify_all()
        return job.future

    def _remove(self, job: Job) -> None:
        """Takes `job` off the queue (the caller holds the lock)."""
        self._queue.remove(job)
        self._queued_bytes -= job.nbytes

    def _drop(self, job: Job) -> None:
        """Forgets a cancelled or expired job taken off the queue: its future is cancelled, it never runs."""
        reason = job.cancel_reason or "timeout"
        job.cancel(reason)
        job.future.cancel()
        self.metrics.observe_dropped(job.kind, reason)
        logger.info(f"Dropped a queued {job.kind} job ({reason}) after {job.queue_time:.3f}s.")

    def _take_batch(self) -> list[Job] | None:
        with self._condition:
            while True:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return None
                first = self._queue[0]
                self._remove(first)
                if not first.expired():
                    break
                self._drop(first)
            batch, weight = [first], first.weight
            if first.key is None or self.max_batch_size <= 1:
                return batch
            deadline = time.perf_counter() + self.batch_wait
            while True:
                for job in list(self._queue):
                    if job.expired():
                        self._remove(job)
                        self._drop(job)
                    elif job.key == first.key and weight + job.weight <= self.max_batch_size:
                        self._remove(job)
                        batch.append(job)
                        weight += job.weight
                remaining = deadline - time.perf_counter()
                if weight >= self.max_batch_size or remaining <= 0 or self._closed:
                    return batch
                self._condition.wait(remaining)

    def _live(self, batch: list[Job]) -> list[Job]:
        """The jobs of `batch` still wanted (a client may have left during the batch wait); the others are dropped."""
        live = []
        for job in batch:
            if job.expired():
                self._drop(job)
            else:
                live.append(job)
        return live

    def _run(self, batch: list[Job]) -> list:
        try:
            results = self.execute(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"the executor returned {len(results)} results for {len(batch)} jobs")
            return results
        except Exception as error:
            if len(batch) == 1:
                return [error]
            logger.warning(f"A batch of {len(batch)} {batch[0].kind} jobs failed ({error!r}); running each alone.")
            results = []
            for job in batch:
                job.batch_size = 1
                results.extend(self._run([job]))
            return results

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = self._live(batch)
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started_at = started
                job.batch_size = len(batch)
                self.metrics.observe_queue_time(job.kind, job.queue_time)
            self.metrics.observe_batch(batch[0].kind, len(batch))
            results = self._run(batch)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
