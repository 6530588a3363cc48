"""Prometheus metrics of the server, written as Prometheus text without a client library.
"""
import logging
import threading
from typing import Any, Callable, Mapping


log = logging.getLogger("duoclass")


# --- Prometheus metrics (text format 0.0.4, written by hand: no global registry) ---------------
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _label_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class _Family:
    """One metric: a counter, gauge or histogram, one value per tuple of label values."""

    def __init__(self, name: str, kind: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()):
        self.name, self.kind, self.help, self.labels, self.buckets = name, kind, help, labels, buckets
        self.values: dict[tuple[str, ...], Any] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + by

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def observe(self, *labels: str, value: float) -> None:
        h = self.values.get(labels)
        if h is None:  # [count per bucket (not cumulative), sum, count]
            h = self.values[labels] = [[0] * len(self.buckets), 0.0, 0]
        for i, b in enumerate(self.buckets):
            if value <= b:
                h[0][i] += 1
                break
        h[1] += value
        h[2] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

        def fmt(labels: tuple[str, ...], le: str | None = None) -> str:
            pairs = list(zip(self.labels, labels)) + ([("le", le)] if le is not None else [])
            return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs) + "}" if pairs else ""

        for labels, v in sorted(self.values.items()):
            if self.kind != "histogram":
                out.append(f"{self.name}{fmt(labels)} {_number(v)}")
                continue
            running = 0
            for b, n in zip(self.buckets, v[0]):
                running += n
                out.append(f"{self.name}_bucket{fmt(labels, _number(b))} {running}")
            out.append(f"{self.name}_bucket{fmt(labels, '+Inf')} {v[2]}")
            out.append(f"{self.name}_sum{fmt(labels)} {_number(v[1])}")
            out.append(f"{self.name}_count{fmt(labels)} {v[2]}")
        return out


class Metrics:
    """The server's counters, gauges and histograms; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        F = _Family
        self.requests = F("duoclass_http_requests_total", "counter", "HTTP requests by method, route and status",
                          ("method", "route", "status"))
        self.latency = F("duoclass_http_request_duration_seconds", "histogram", "HTTP request latency by route",
                         ("route",), LATENCY_BUCKETS)
        self.errors = F("duoclass_errors_total", "counter", "requests answered with an error, by kind", ("kind",))
        self.items = F("duoclass_predict_items_total", "counter", "items predicted, by model and outcome",
                       ("model", "outcome"))
        self.batch_size = F("duoclass_batch_size", "histogram", "items per model call", ("model",), BATCH_BUCKETS)
        self.batch_seconds = F("duoclass_batch_duration_seconds", "histogram", "seconds per model call (decoding included)",
                               ("model",), LATENCY_BUCKETS)
        self.queue_wait = F("duoclass_queue_wait_seconds", "histogram", "seconds an item waited in its model's queue",
                            ("model",), LATENCY_BUCKETS)
        self.queue_depth = F("duoclass_queue_depth", "gauge", "items waiting in each model's queue", ("model",))
        self.in_flight = F("duoclass_requests_in_flight", "gauge", "requests being handled now", ())
        self.explained = F("duoclass_explain_items_total", "counter", "items explained, by model and outcome",
                           ("model", "outcome"))
        self.info = F("duoclass_model_info", "gauge", "models served (value 1)", ("model", "task", "backend"))
        self.families = [self.requests, self.latency, self.errors, self.items, self.batch_size, self.batch_seconds,
                         self.queue_wait, self.queue_depth, self.in_flight, self.explained, self.info]
        self.in_flight.set(value=0)

    def __call__(self, fn: Callable[..., None], *labels: str, **kw: float) -> None:
        """metrics(metrics.errors.inc, "bad_image"): one update under the lock."""
        with self._lock:
            fn(*labels, **kw)

    def render(self, depths: Mapping[str, int]) -> str:
        with self._lock:
            for name, d in depths.items():
                self.queue_depth.set(name, value=d)
            return "\n".join(line for f in self.families for line in f.render()) + "\n"
