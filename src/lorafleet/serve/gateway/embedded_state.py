"""The embedded serving state, lorafleet's default: the keys file (tenants.py), each tenant's
windows in this process, the request log in the fleet's SQLite database (request_log.py). A thin
wrapper that gives what already exists the `ServingState` shape; it changes none of it.

Its keys are the keys file's, read at start and reloaded on SIGHUP or POST /v1/keys/reload:
creating, revoking or rotating a key through the API is refused with what to do instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, date, datetime

from lorafleet.serve.gateway.request_log import RequestLog, RequestRecord
from lorafleet.serve.gateway.state import (
    FREE,
    IssuedKey,
    KeyInfo,
    KeysAreReadOnly,
    Prices,
    TenantSettings,
    UsageRow,
)
from lorafleet.serve.gateway.tenants import Tenant, TenantDirectory


class EmbeddedState:
    remote = False  # a row in SQLite, written on the event loop as before

    def __init__(
        self, directory: Callable[[], TenantDirectory | None], request_log: RequestLog, prices: Prices = FREE
    ) -> None:
        # A getter, not the directory: reloading the keys file replaces the directory in force.
        self._directory = directory
        self.request_log = request_log
        self.prices = prices

    @property
    def unavailable(self) -> dict[tuple[str, str], int]:
        return {}  # nothing here can be out of reach

    @property
    def keys_required(self) -> bool:
        return self._directory() is not None

    def authenticate(self, key: str | None) -> Tenant | None:
        directory = self._directory()
        return directory.authenticate(key) if directory is not None else None

    def count_request(self, tenant: Tenant) -> float | None:
        wait = tenant.retry_after()
        if wait is None:
            tenant.record_request()
        return wait

    def over_budget(self, tenant: Tenant) -> str | None:
        return None  # budgets are set through the admin API, which needs the shared state

    def reserve_tokens(self, tenant: Tenant, tokens: int) -> tuple[object | None, float]:
        return tenant.reserve(tokens)

    def settle_tokens(self, tenant: Tenant, reservation: object | None, tokens: int) -> None:
        tenant.settle(reservation, tokens)

    def log_request(self, record: RequestRecord) -> None:
        self.request_log.record(record)

    def usage(self, since: date, tenant: str | None = None) -> list[UsageRow]:
        """Summed from the request log, which is the embedded state's record of usage."""
        start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()
        query = (
            "SELECT date(time, 'unixepoch'), tenant, model, count(*), sum(prompt_tokens), sum(completion_tokens)"
            " FROM requests WHERE time >= ? AND (? IS NULL OR tenant = ?) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        db = sqlite3.connect(self.request_log.path, timeout=30)
        try:
            rows = db.execute(query, (start, tenant, tenant)).fetchall()
        finally:
            db.close()
        return [
            UsageRow(
                date.fromisoformat(day),
                tenant,
                model,
                requests,
                prompt,
                completion,
                self.prices.cost(prompt, completion),
            )
            for day, tenant, model, requests, prompt, completion in rows
        ]

    def import_keys_file(self, directory: TenantDirectory) -> int:
        return 0  # the directory in force is the file itself

    def tenants(self) -> list[TenantSettings]:
        directory = self._directory()
        return [_settings(tenant) for tenant in directory.tenants] if directory is not None else []

    def keys(self, tenant: str | None = None) -> list[KeyInfo]:
        directory = self._directory()
        listed = directory.tenants if directory is not None else []
        return [KeyInfo(t.key_id, t.name) for t in listed if tenant is None or t.name == tenant]

    def put_tenant(self, settings: TenantSettings) -> None:
        raise self._read_only()

    def create_key(self, tenant: str, expires: datetime | None = None) -> IssuedKey:
        raise self._read_only()

    def revoke_key(self, key_id: str) -> KeyInfo:
        raise self._read_only()

    def rotate_key(self, key_id: str) -> IssuedKey:
        raise self._read_only()

    def close(self) -> None:
        self.request_log.close()

    def _read_only(self) -> KeysAreReadOnly:
        directory = self._directory()
        source = directory.source if directory is not None else None
        where = f"the keys file {source}" if source else "the keys file given with --keys"
        return KeysAreReadOnly(
            f"this server's keys are {where}: edit it (lorafleet keys new makes a key, lorafleet keys hash its hash) "
            "and reload it (kill -HUP, or POST /v1/keys/reload); to manage keys live, serve with "
            "--state postgresql://… --redis redis://…"
        )


def _settings(tenant: Tenant) -> TenantSettings:
    return TenantSettings(
        tenant.name,
        tenant.adapters,
        tenant.admin,
        tenant.requests_per_minute,
        tenant.tokens_per_minute,
        max_rows=tenant.max_rows,
    )
