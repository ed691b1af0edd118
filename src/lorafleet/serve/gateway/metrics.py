"""Prometheus metrics per adapter: requests, tokens, latency, time to first token; per tenant and
adapter: requests and tokens (tenants are the keys file's, so their number is bounded); the
engine's running and waiting requests; and the audit log's: entries not written, and (when it is
shipped off the host) shipped, not shipped, queued; and, for replicas, how often the shared
state could not be reached and what was done instead."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lorafleet.governance.shipping import Shipper

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(
        self,
        running: Callable[[], int],
        audit_failures: Callable[[], int] = lambda: 0,
        audit_shipper: Callable[[], Shipper | None] = lambda: None,
        waiting: Callable[[], int] = lambda: 0,
        state_unavailable: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_requests", "Chat completion requests", ["model", "status"], registry=self.registry
        )
        self.tokens = Counter("lorafleet_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.tenant_requests = Counter(
            "lorafleet_tenant_requests",
            "Requests per tenant (empty: a server without keys) and model",
            ["tenant", "model", "status"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "lorafleet_tenant_tokens",
            "Tokens per tenant and model",
            ["tenant", "model", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorafleet_request_latency_seconds",
            "Request latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        running_gauge = Gauge("lorafleet_running_sequences", "Sequences in the running batch", registry=self.registry)
        running_gauge.set_function(running)
        waiting_gauge = Gauge(
            "lorafleet_waiting_requests", "Requests waiting for a place in the running batch", registry=self.registry
        )
        waiting_gauge.set_function(waiting)
        failures = Gauge(
            "lorafleet_audit_append_failures",
            "Audit log entries that could not be written, and checkpoints that could not be signed, since the "
            "server started (alert when above 0)",
            registry=self.registry,
        )
        failures.set_function(audit_failures)
        self.registry.register(_ShippingCollector(audit_shipper))
        self.registry.register(_StateCollector(state_unavailable))

    def observe(
        self, model: str, status: int, prompt_tokens: int, completion_tokens: int, seconds: float, tenant: str = ""
    ) -> None:
        self.requests.labels(model, str(status)).inc()
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)
        self.latency.labels(model).observe(seconds)
        self.tenant_requests.labels(tenant, model, str(status)).inc()
        self.tenant_tokens.labels(tenant, model, "prompt").inc(prompt_tokens)
        self.tenant_tokens.labels(tenant, model, "completion").inc(completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ShippingCollector:
    """The shipper's counts, read at each scrape (nothing when the server ships nowhere)."""

    def __init__(self, shipper: Callable[[], Shipper | None]) -> None:
        self.shipper = shipper

    def collect(self):
        shipper = self.shipper()
        if shipper is None:
            return
        counts = shipper.counts
        yield CounterMetricFamily("lorafleet_audit_shipped", "Audit entries shipped off the host", value=counts.shipped)
        yield CounterMetricFamily(
            "lorafleet_audit_unshipped",
            "Audit entries that could not be shipped when written (receiver down or refusing, queue full); "
            "they are shipped from the log once it answers (alert when it keeps growing)",
            value=counts.unshipped,
        )
        yield CounterMetricFamily(
            "lorafleet_audit_ship_rejected", "Audit entries the receiver refused as bad data", value=counts.rejected
        )
        yield GaugeMetricFamily(
            "lorafleet_audit_ship_queue", "Audit entries waiting to be shipped", value=shipper.queued
        )


class _StateCollector:
    """lorafleet_state_unavailable_total{store, outcome}: the shared state out of reach (nothing
    for the embedded state, which cannot be)."""

    def __init__(self, counts: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self.counts = counts

    def collect(self):
        family = CounterMetricFamily(
            "lorafleet_state_unavailable",
            "Times the shared state's store could not be reached, by what was done: refused (503), local_limits "
            "(limits held on this replica alone), unlogged (a reply withheld, 503), unsettled (a token hold left to "
            "expire)",
            labels=["store", "outcome"],
        )
        for (store, outcome), count in sorted(dict(self.counts()).items()):
            family.add_metric([store, outcome], count)
        yield family
