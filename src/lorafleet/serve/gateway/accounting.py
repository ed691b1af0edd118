"""What a completion call leaves behind once it has ended, refused or answered: the tenant's
token reservation settled to what it used, Prometheus metrics, a row of the request log and an
entry of the audit log (serve/gateway/audit_trail.py says what each field of it is). A call
without a valid key leaves the metrics only."""

from __future__ import annotations

import asyncio
import sys
import time

from lorafleet.governance.audit import utc_time
from lorafleet.serve.gateway.access import who
from lorafleet.serve.gateway.audit_trail import content_sha256
from lorafleet.serve.gateway.calls import Call
from lorafleet.serve.gateway.metrics import Metrics
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.state import StateUnavailable

UNKNOWN_MODEL = "unknown"  # the metric label and log name of a call before it names a model it may use


class Recorder:
    def __init__(self, server: FleetServer) -> None:
        self.server = server
        self.metrics = Metrics(
            server.backend.running,
            lambda: server.audit.failures,
            lambda: server.audit.shipper,
            waiting=server.backend.waiting,
            state_unavailable=lambda: server.state.unavailable,
        )

    async def record(self, call: Call) -> None:
        """Record an ended call (`Call.finish`), once. One refused for its key (401) is counted in
        the metrics only: anyone who reaches the port can send those, and must not fill the disk. A
        replica's audit entry is written before this returns, and so before the reply is complete
        (audit_trail.py says why)."""
        if call.tenant is not None:
            self.server.state.settle_tokens(call.tenant, call.reservation, call.prompt_tokens + call.completion_tokens)
        self._observe(call)
        if call.status == 401:
            return
        await self._log(
            RequestRecord(
                call.request_id,
                call.tenant.name if call.tenant else None,
                call.model[:200],
                call.prompt_tokens,
                call.completion_tokens,
                call.seconds * 1000,
                call.status,
                call.error,
            )
        )
        content = None  # with --log-content: to the audit log only, which replaces personal data in it
        if call.content is not None:
            content = call.content | ({"reply": call.replies[0]} if call.replies else {})
        entry = audit_entry(call, content, self.server.adapter_ids)
        if self.server.audit.replica is None:
            self.server.audit.record("serve.request", entry)
        else:
            await asyncio.wrap_future(self.server.audit.record_durably("serve.request", entry))

    async def _log(self, record: RequestRecord) -> None:
        """The request log's row. The shared state refuses requests while its PostgreSQL is out of
        reach (503 at admission); one that lost it while it ran is still answered and in the audit
        log, its row counted as unlogged (lorafleet_state_unavailable_total) and reported here."""
        state = self.server.state
        try:
            if state.remote:
                await asyncio.to_thread(state.log_request, record)
            else:
                state.log_request(record)
        except StateUnavailable as err:
            print(f"lorafleet: request {record.request_id} not in the request log: {err}", file=sys.stderr)

    def _observe(self, call: Call) -> None:
        # Metric labels only for models that exist and the caller may use: a client cannot mint
        # label values (each one is a time series held in memory and rendered on every scrape).
        label = call.model if call.known_model else UNKNOWN_MODEL
        tenant = call.tenant.name if call.tenant else ""  # a tenant of the keys file: a bounded label too
        self.metrics.observe(label, call.status, call.prompt_tokens, call.completion_tokens, call.seconds, tenant)
        if call.first_token_seconds is not None:
            self.metrics.first_token.labels(label).observe(call.first_token_seconds)


def audit_entry(call: Call, content: dict | None, ids: dict) -> dict:
    """An ended call as the audit log records it; `ids` are the registry ids of the adapters served."""
    adapter = call.model if call.known_model and call.model in ids else None
    entry = who(call.tenant) | {
        "request_id": call.request_id,
        "started": utc_time(time.time() - call.seconds),
        "model": call.model[:200],
        "adapter": adapter,
        "adapter_id": ids.get(adapter) if adapter else None,
        "input_sha256": call.input_sha256,
        "output_sha256": content_sha256(call.replies) if call.replies is not None else None,
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "status": call.status,
        "error": call.error,
        "latency_ms": round(call.seconds * 1000, 3),
    }
    return entry | ({"content": content} if content is not None else {})
