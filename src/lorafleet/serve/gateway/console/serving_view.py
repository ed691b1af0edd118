"""The Serving page's numbers, read from the server's own Prometheus counters (the ones /metrics
exposes, so the page and a scraper never disagree): requests and tokens per adapter and per tenant,
latency p50/p99 estimated from the latency histogram as Prometheus' `histogram_quantile` does,
sequences running and requests waiting, and tokens/s as the change of the completion-token
counter between two samples a second or more apart.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry

HISTORY = 300  # tokens/s samples kept for the chart: five minutes at one a second
MIN_INTERVAL_S = 1.0


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in registry.collect() for s in family.samples]


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """`histogram_quantile`: the q-th quantile from cumulative (upper bound, count) buckets, linear
    within the bucket it falls in; None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # above the largest finite bound: Prometheus answers that bound
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def serving_snapshot(registry: CollectorRegistry) -> dict:
    """Totals since the server started, by adapter (model) and by tenant and adapter."""
    models: dict[str, dict] = {}
    tenants: dict[tuple[str, str], dict] = {}
    buckets: dict[float, float] = {}
    gauges = {}
    for name, labels, value in samples(registry):
        if name == "lorafleet_requests_total":
            row = models.setdefault(labels["model"], _row())
            row["requests"] += value
            row["errors"] += value if not labels["status"].startswith("2") else 0
        elif name == "lorafleet_tokens_total":
            models.setdefault(labels["model"], _row())[f"{labels['kind']}_tokens"] += value
        elif name == "lorafleet_tenant_requests_total":
            tenants.setdefault((labels["tenant"], labels["model"]), _row())["requests"] += value
        elif name == "lorafleet_tenant_tokens_total":
            tenants.setdefault((labels["tenant"], labels["model"]), _row())[f"{labels['kind']}_tokens"] += value
        elif name == "lorafleet_request_latency_seconds_bucket":
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif name in ("lorafleet_running_sequences", "lorafleet_waiting_requests"):
            gauges[name] = value
    pairs = list(buckets.items())
    return {
        "models": [{"model": model} | row for model, row in sorted(models.items())],
        "tenants": [{"tenant": tenant, "model": model} | row for (tenant, model), row in sorted(tenants.items())],
        "latency_p50_s": quantile(0.5, pairs),
        "latency_p99_s": quantile(0.99, pairs),
        "running": gauges.get("lorafleet_running_sequences", 0),
        "waiting": gauges.get("lorafleet_waiting_requests", 0),
        "completion_tokens": sum(row["completion_tokens"] for row in models.values()),
    }


def _row() -> dict:
    return {"requests": 0.0, "errors": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0}


class ServingSampler:
    """Snapshots with the tokens/s since the previous sample, and the recent history of that rate."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.history: deque[tuple[float, float]] = deque(maxlen=HISTORY)  # (unix time, tokens/s)
        self._last: tuple[float, float] | None = None  # (monotonic time, completion tokens)
        self._lock = threading.Lock()

    def sample(self) -> dict:
        snapshot = serving_snapshot(self.registry)
        now, tokens = time.monotonic(), snapshot["completion_tokens"]
        with self._lock:
            if self._last is None:
                self._last = (now, tokens)
            elif now - self._last[0] >= MIN_INTERVAL_S:
                rate = (tokens - self._last[1]) / (now - self._last[0])
                self.history.append((round(time.time(), 3), round(rate, 2)))
                self._last = (now, tokens)
            snapshot["tokens_per_s"] = self.history[-1][1] if self.history else 0.0
            snapshot["history"] = list(self.history)
        return snapshot
