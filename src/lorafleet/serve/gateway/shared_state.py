"""The shared serving state: PostgreSQL (postgres_store.py) for keys, tenants, usage and the request
log, Redis (redis_windows.py) for the rate and token windows. Any number of gateway replicas
pointed at the same two servers act as one gateway: one limit per tenant, one list of keys, one
record of usage, so a replica holds nothing that another needs and can be stopped at any time.

Keys are looked up in memory, never per request in the database: each replica holds every usable
key's hash with its tenant and reloads them when the database's change counter moves, which a
thread polls every `REFRESH_SECONDS` — so a key revoked through any replica is refused by all
within that, well inside a second. A database that cannot be reached leaves the keys in force as
they were (no change could be made there meanwhile), and polling goes on until it is back.

When a store cannot be reached the gateway never answers 500. PostgreSQL down (the last poll
failed, or a write): requests are refused with 503 — a request that cannot be logged and metered
is not served — until it answers again. Redis down: the limits follow `when_unavailable`:
"closed" refuses with 503; "open" holds each tenant to its limits on this replica's own windows
(the embedded ones), so N replicas let at most N times a limit through while Redis is away. After
a Redis failure the next `REDIS_RETRY_SECONDS` go straight to that policy instead of each waiting
for a timeout; then Redis is tried again, so the gateway recovers without a restart. Every such
outcome is counted (`unavailable`, in /metrics as lorafleet_state_unavailable_total).

The drivers are imported here and nowhere else, and this module only when `--state` names a
database: `pip install 'lorafleet[replicas]'`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime

from lorafleet.serve.gateway.postgres_store import PostgresStore
from lorafleet.serve.gateway.redis_windows import RedisWindows
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.state import (
    FREE,
    IssuedKey,
    KeyInfo,
    Prices,
    StateUnavailable,
    TenantSettings,
    UsageRow,
)
from lorafleet.serve.gateway.tenants import WINDOW_SECONDS, Tenant, TenantDirectory, hash_key

REFRESH_SECONDS = 0.25
REDIS_RETRY_SECONDS = 1.0
FAILURE_POLICIES = ("closed", "open")


class SharedState:
    def __init__(
        self,
        database_url: str,
        redis_url: str,
        replica: str,
        refresh_seconds: float = REFRESH_SECONDS,
        window_seconds: float = WINDOW_SECONDS,
        when_unavailable: str = "closed",
        prices: Prices = FREE,
    ) -> None:
        if when_unavailable not in FAILURE_POLICIES:
            raise ValueError(f"when_unavailable must be one of {FAILURE_POLICIES}, not {when_unavailable!r}")
        self.replica = replica  # names this replica in the request log
        self.refresh_seconds = refresh_seconds
        self.when_unavailable = when_unavailable
        self.prices = prices
        self._budgets: dict[str, tuple[int | None, float | None]] = {}  # tenant -> monthly tokens, cost
        self._spent: dict[str, tuple[int, float]] = {}  # tenant -> tokens, cost this month, as of the last poll
        self.unavailable: Counter[tuple[str, str]] = Counter()  # (store, what was done) -> times
        self.postgres_reachable = True  # as of the last poll
        self._redis_retry_at = 0.0  # monotonic time before which Redis is taken to be down
        self.store = PostgresStore(database_url)
        self.windows = RedisWindows(redis_url, window_seconds)
        self.failed_refreshes = 0
        self._keys: dict[str, tuple[Tenant, datetime | None]] = {}  # key hash -> its tenant, its expiry
        self._version: int | None = None
        self._lock = threading.Lock()  # one refresh at a time: the poller's, or one after a change here
        self.refresh()
        self.refresh_spend()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="lorafleet-state-refresh", daemon=True)
        self._poller.start()

    # --- who asks ---------------------------------------------------------------------------

    keys_required = True  # a replica is reached over the network: never without a key
    remote = True

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key:
            return None
        found = self._keys.get(hash_key(key))
        if found is None:
            return None
        tenant, expires = found
        return tenant if expires is None or expires > datetime.now(UTC) else None

    def refresh(self) -> None:
        """Reload the keys if anything changed since the last load."""
        with self._lock:
            if self.store.change_version() == self._version:
                return
            version, rows = self.store.directory()
            self._keys = {digest: (settings.tenant(digest), expires) for digest, expires, settings in rows}
            self._budgets = {
                settings.name: (settings.monthly_token_budget, settings.monthly_cost_budget)
                for _, _, settings in rows
                if settings.monthly_token_budget is not None or settings.monthly_cost_budget is not None
            }
            self._version = version

    def refresh_spend(self) -> None:
        """This month's spend of the tenants with a budget (one query, whatever their number)."""
        self._spent = self.store.month_to_date(sorted(self._budgets))

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
                self.refresh_spend()
                self.postgres_reachable = True
            except StateUnavailable:
                self.postgres_reachable = False  # the keys in force stay; the next poll tries again

    # --- the windows --------------------------------------------------------------------------

    def count_request(self, tenant: Tenant) -> float | None:
        if not self.postgres_reachable:  # what could not be logged and metered is not served
            self.unavailable["postgresql", "refused"] += 1
            raise StateUnavailable(f"PostgreSQL did not answer this replica's last poll ({self.replica})")
        if tenant.requests_per_minute is None and tenant.tokens_per_minute is None:
            return None  # nothing to hold it to: no round trip
        return self._windows(
            lambda: self.windows.count_request(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute),
            lambda: _count_locally(tenant),
        )

    def over_budget(self, tenant: Tenant) -> str | None:
        """Checked against the spend of the last poll: every replica sees a tenant reach its budget
        within `refresh_seconds`, so it can be overrun by what is admitted meanwhile, no more."""
        tokens_budget, cost_budget = self._budgets.get(tenant.name, (None, None))
        tokens, cost = self._spent.get(tenant.name, (0, 0.0))
        if tokens_budget is not None and tokens >= tokens_budget:
            return f"tenant {tenant.name} has used {tokens} of its {tokens_budget} tokens this month"
        if cost_budget is not None and cost >= cost_budget:
            return f"tenant {tenant.name} has spent {cost:.4f} of its {cost_budget:g} this month"
        return None

    def reserve_tokens(self, tenant: Tenant, tokens: int) -> tuple[object | None, float]:
        if tenant.tokens_per_minute is None:
            return None, 0.0
        return self._windows(
            lambda: self.windows.reserve(tenant.name, tokens, tenant.tokens_per_minute), lambda: tenant.reserve(tokens)
        )

    def settle_tokens(self, tenant: Tenant, reservation: object | None, tokens: int) -> None:
        if reservation is None:  # the tenant has no token limit: nothing counts its tokens
            return
        if not isinstance(reservation, int):  # held on this replica's windows while Redis was away
            tenant.settle(reservation, tokens)
            return
        try:
            self.windows.settle(tenant.name, reservation, tokens)
        except StateUnavailable:  # the request has been answered: its hold expires with the window
            self.unavailable["redis", "unsettled"] += 1

    def _windows(self, shared, local):
        """`shared()` on Redis; when Redis cannot be reached, the failure policy: StateUnavailable
        (closed), or `local()` on this replica's own windows (open)."""
        if time.monotonic() >= self._redis_retry_at:
            try:
                return shared()
            except StateUnavailable:
                self._redis_retry_at = time.monotonic() + REDIS_RETRY_SECONDS
                if self.when_unavailable == "closed":
                    self.unavailable["redis", "refused"] += 1
                    raise
        elif self.when_unavailable == "closed":
            self.unavailable["redis", "refused"] += 1
            raise StateUnavailable(f"Redis did not answer within the last {REDIS_RETRY_SECONDS:.0f} s")
        self.unavailable["redis", "local_limits"] += 1
        return local()

    # --- what happened ------------------------------------------------------------------------

    def log_request(self, record: RequestRecord) -> None:
        try:
            self.store.log_request(
                record, self.replica, self.prices.cost(record.prompt_tokens, record.completion_tokens)
            )
        except StateUnavailable:
            self.unavailable["postgresql", "unlogged"] += 1
            raise

    def usage(self, since: date, tenant: str | None = None) -> list[UsageRow]:
        return self.store.usage(since, tenant)

    # --- administration -----------------------------------------------------------------------

    def tenants(self) -> list[TenantSettings]:
        return self.store.tenants()

    def put_tenant(self, settings: TenantSettings) -> None:
        self.store.put_tenant(settings)
        self.refresh()

    def keys(self, tenant: str | None = None) -> list[KeyInfo]:
        return self.store.keys(tenant)

    def create_key(self, tenant: str, expires: datetime | None = None) -> IssuedKey:
        issued = self.store.create_key(tenant, expires)
        self.refresh()
        return issued

    def revoke_key(self, key_id: str) -> KeyInfo:
        info = self.store.revoke_key(key_id)
        self.refresh()
        return info

    def rotate_key(self, key_id: str) -> IssuedKey:
        issued = self.store.rotate_key(key_id)
        self.refresh()
        return issued

    def import_keys_file(self, directory: TenantDirectory) -> int:
        """The keys file's tenants and keys, into the database: the file's settings replace a
        tenant's (its budgets, which a keys file does not hold, stay), and a key is added unless
        the database knows it already (so a key revoked there stays revoked). Returns how many
        keys were added."""
        known = {settings.name: settings for settings in self.store.tenants()}
        added = 0
        for tenant in directory.tenants:
            settings = replace(
                known.get(tenant.name, TenantSettings(tenant.name)),  # budgets are not in the file: they stay
                adapters=tenant.adapters,
                admin=tenant.admin,
                requests_per_minute=tenant.requests_per_minute,
                tokens_per_minute=tenant.tokens_per_minute,
                max_rows=tenant.max_rows,
            )
            self.store.put_tenant(settings)
            added += self.store.import_key(tenant.name, tenant.key_sha256)
        self.refresh()
        return added

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
        self.store.close()
        self.windows.close()


def _count_locally(tenant: Tenant) -> float | None:
    """The embedded state's count: the tenant's own windows on this replica."""
    wait = tenant.retry_after()
    if wait is None:
        tenant.record_request()
    return wait
