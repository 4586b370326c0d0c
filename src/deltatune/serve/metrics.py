"""Prometheus-style metrics in a few lines: counters, gauges and histograms with labels, rendered as text.

Thread-safe (the engine's worker thread and the HTTP handlers both record); no dependency on
``prometheus_client``. The text follows the exposition format 0.0.4 (``# HELP``, ``# TYPE``, one sample a line,
histograms as cumulative ``_bucket{le=...}`` plus ``_sum`` and ``_count``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when rendered (``fn``), or set."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.fn, self._value = fn, 0.0

    def set(self, value: float) -> None:
        self._value = value

    def render(self) -> list[str]:
        v = self.fn() if self.fn is not None else self._value
        return self.header() + [f"{self.name} {_num(v)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # counts per bucket (+Inf), [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            data = self._data.get(self._key(labels))
            return sum(data[0]) if data else 0

    def max_bucket(self, **labels: str) -> float:
        """The upper bound of the highest non-empty bucket (0 if nothing was observed)."""
        with self._lock:
            data = self._data.get(self._key(labels))
        if not data:
            return 0.0
        top = max(i for i, c in enumerate(data[0]) if c)
        return self.buckets[top] if top < len(self.buckets) else float("inf")

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._data.items())
        for key, (counts, total) in items:
            running = 0
            for bound, c in zip([*self.buckets, float("inf")], counts):
                running += c
                le = 'le="' + ("+Inf" if bound == float("inf") else _num(bound)) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return out


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.requests = Counter("deltatune_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("deltatune_prompt_tokens_total", "Prompt tokens processed.")
        self.generated_tokens = Counter("deltatune_generated_tokens_total", "Tokens generated.")
        self.finished = Counter("deltatune_generations_total", "Generations by finish reason "
                                "(stop, length, cancelled, error).", ("reason",))
        self.batch_size = Histogram("deltatune_batch_size", "Rows per forward pass (prefill or decode step).",
                                    BATCH_BUCKETS, ("phase",))
        self.batch_adapters = Histogram("deltatune_batch_adapters", "Distinct adapters (base counts as one) per "
                                        "forward pass.", BATCH_BUCKETS, ("phase",))
        self.latency = Histogram("deltatune_request_latency_seconds", "Time from arrival to the last token.",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "Time from arrival to the first token.",
                              LATENCY_BUCKETS)
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help, fn))

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.generated_tokens, self.finished, self.batch_size,
                  self.batch_adapters, self.latency, self.ttft, *self.gauges):
            lines += m.render()
        return "\n".join(lines) + "\n"
