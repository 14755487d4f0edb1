"""Prometheus text-format metrics of the BAGEL server, kept by hand (no extra dependency)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque


__all__ = ["ServerMetrics"]

_QUANTILES = (0.5, 0.9, 0.99)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Summary:
    """Count, sum and quantiles over the last `window` observations of one series."""

    def __init__(self, window: int = 1000):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.recent.append(value)


def _labels(names: tuple[str, ...], values: tuple) -> str:
    def escape(value) -> str:
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{name}="{escape(value)}"' for name, value in zip(names, values))


class ServerMetrics:
    """
    Thread-safe counters and summaries of the server, rendered by [`~ServerMetrics.render`] in the Prometheus text
    exposition format: requests by endpoint and status, request latency and queue time by endpoint, batch sizes of
    the pipeline calls, jobs dropped unrun (client gone, timeout), the queue depth and the bytes the queue holds.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._latency: dict[str, _Summary] = defaultdict(_Summary)
        self._queue_time: dict[str, _Summary] = defaultdict(_Summary)
        self._batch_size: dict[str, _Summary] = defaultdict(_Summary)
        self._dropped: dict[tuple[str, str], int] = defaultdict(int)
        self.queue_depth = lambda: 0
        self.queue_bytes = lambda: 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request: its endpoint (route path), HTTP status and latency."""
        with self._lock:
            self._requests[(endpoint, status)] += 1
            self._latency[endpoint].observe(seconds)

    def observe_queue_time(self, kind: str, seconds: float) -> None:
        """Time a job of `kind` ("generate", "edit", "chat") waited in the queue before its pipeline call."""
        with self._lock:
            self._queue_time[kind].observe(seconds)

    def observe_batch(self, kind: str, size: int) -> None:
        """One pipeline (or generate) call of `kind` that served `size` requests."""
        with self._lock:
            self._batch_size[kind].observe(size)

    def observe_dropped(self, kind: str, reason: str) -> None:
        """One queued job of `kind` dropped before it ran: its client went away (`"disconnected"`) or its time ran
        out (`"timeout"`)."""
        with self._lock:
            self._dropped[(kind, reason)] += 1

    def dropped(self, kind: str, reason: str) -> int:
        """How many jobs of `kind` were dropped for `reason` (for tests and logs)."""
        with self._lock:
            return self._dropped.get((kind, reason), 0)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines = []
        with self._lock:
            lines += ["# HELP bagel_requests_total Requests answered, by endpoint and HTTP status.",
                      "# TYPE bagel_requests_total counter"]  # fmt: skip
            for (endpoint, status), count in sorted(self._requests.items()):
                lines.append(f"bagel_requests_total{{{_labels(('endpoint', 'status'), (endpoint, status))}}} {count}")
            lines += ["# HELP bagel_jobs_dropped_total Queued jobs dropped unrun, by kind and reason.",
                      "# TYPE bagel_jobs_dropped_total counter"]  # fmt: skip
            for (kind, reason), count in sorted(self._dropped.items()):
                lines.append(f"bagel_jobs_dropped_total{{{_labels(('kind', 'reason'), (kind, reason))}}} {count}")
            for name, help_text, series, label in (
                ("bagel_request_latency_seconds", "Request latency, by endpoint.", self._latency, "endpoint"),
                ("bagel_queue_time_seconds", "Time a job waited in the queue, by kind.", self._queue_time, "kind"),
                ("bagel_batch_size", "Requests served by one pipeline call, by kind.", self._batch_size, "kind"),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} summary"]
                for key, summary in sorted(series.items()):
                    ordered = sorted(summary.recent)
                    for q in _QUANTILES:
                        labels = _labels((label, "quantile"), (key, q))
                        lines.append(f"{name}{{{labels}}} {_quantile(ordered, q):.6g}")
                    lines.append(f"{name}_sum{{{_labels((label,), (key,))}}} {summary.total:.6g}")
                    lines.append(f"{name}_count{{{_labels((label,), (key,))}}} {summary.count}")
        lines += ["# HELP bagel_queue_depth Jobs waiting for the worker.", "# TYPE bagel_queue_depth gauge",
                  f"bagel_queue_depth {self.queue_depth()}",
                  "# HELP bagel_queue_bytes Bytes of input (compressed images, texts) held by the waiting jobs.",
                  "# TYPE bagel_queue_bytes gauge", f"bagel_queue_bytes {self.queue_bytes()}"]  # fmt: skip
        return "\n".join(lines) + "\n"
