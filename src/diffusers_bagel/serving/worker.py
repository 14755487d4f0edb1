"""
The worker thread of the BAGEL server: it owns the pipeline, takes jobs from a bounded queue in arrival order, and
runs the jobs that share a batching key as one call.
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
    """The queue holds `max_queue` jobs already; the request is refused (HTTP 429)."""


@dataclass(eq=False)
class Job:
    """
    One request's work for the worker.

    Args:
        kind (`str`): `"generate"`, `"edit"` or `"chat"`.
        key (`Hashable`, *optional*): jobs with equal keys may run as one call; `None` runs the job alone.
        weight (`int`): how much of `max_batch_size` the job takes (its number of images).
        payload (`Any`): what the executor needs (validated inputs).
    """

    kind: str
    key: Hashable | None
    weight: int
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    batch_size: int = 1
    cancelled: bool = False

    @property
    def queue_time(self) -> float:
        """Seconds between submission and the start of the job's call (so far, if it has not started)."""
        return (self.started_at or time.perf_counter()) - self.enqueued_at


class BatchWorker:
    """
    A single thread that runs `execute(jobs) -> list[result | Exception]` (one entry per job, in order) on batches of
    queued jobs. The first waiting job starts a batch; later waiting jobs with the same `key` join it while the sum of
    their weights stays within `max_batch_size` (a job heavier than that still runs, alone). When the call itself
    raises for a batch of several jobs, each job is run again alone, so one bad request cannot fail the others.

    Args:
        execute (`Callable`): runs a batch; called only from the worker thread.
        max_batch_size (`int`): largest total weight of one batch (1 disables batching).
        max_queue (`int`): jobs allowed to wait; [`~BatchWorker.submit`] raises [`QueueFullError`] beyond it.
        metrics ([`ServerMetrics`]): receives queue times and batch sizes.
        batch_wait (`float`, defaults to 0.01): seconds the worker waits for companions of a batchable job when
            the queue holds fewer than a full batch (0: take what is there).
    """

    def __init__(
        self,
        execute: Callable[[list[Job]], list],
        max_batch_size: int,
        max_queue: int,
        metrics: ServerMetrics,
        batch_wait: float = 0.01,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"`max_batch_size` and `max_queue` must be >= 1, got {max_batch_size}, {max_queue}.")
        self.execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.batch_wait = batch_wait
        self._queue: deque[Job] = deque()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        metrics.queue_depth = self.depth

    def depth(self) -> int:
        """Jobs waiting (not the running batch)."""
        return len(self._queue)

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
        """Queues `job` and returns its future. Raises [`QueueFullError`] when `max_queue` jobs wait already."""
        self.start()
        with self._condition:
            if self._closed:
                raise RuntimeError("The server is shutting down.")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"The server's queue is full ({self.max_queue} requests wait); retry later.")
            self._queue.append(job)
            self._condition.notify_all()
        return job.future

    def _take_batch(self) -> list[Job] | None:
        with self._condition:
            while True:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return None
                first = self._queue.popleft()
                if not first.cancelled:
                    break
            batch, weight = [first], first.weight
            if first.key is None or self.max_batch_size <= 1:
                return batch
            deadline = time.perf_counter() + self.batch_wait
            while True:
                for job in list(self._queue):
                    if job.cancelled:
                        self._queue.remove(job)
                    elif job.key == first.key and weight + job.weight <= self.max_batch_size:
                        self._queue.remove(job)
                        batch.append(job)
                        weight += job.weight
                remaining = deadline - time.perf_counter()
                if weight >= self.max_batch_size or remaining <= 0 or self._closed:
                    return batch
                self._condition.wait(remaining)

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
