"""Where a gateway keeps what outlives a request: who may call (keys and tenants), what they have
used (rate and token windows, usage, the request log). One interface, two implementations:

- embedded (`embedded_state.EmbeddedState`, the default): the keys file, windows in this process,
  the request log in the fleet's SQLite database. Zero set-up; one process enforces the limits.
- shared (`shared_state.SharedState`, `lorafleet serve --state postgresql://… --redis redis://…`):
  keys (hashed), tenants, usage and the request log in PostgreSQL, the windows in Redis, checked
  and reserved atomically there, so that any number of replicas enforce one limit and a key
  revoked through one replica is refused by all of them.

The gateway (access, serving, accounting) speaks only to `ServingState`. The shared
implementation's drivers (psycopg, redis) are an optional extra, `lorafleet[replicas]`, imported
only when `--state` names a database: the embedded path and the GPU image never load them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from lorafleet.errors import LorafleetError
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.tenants import Tenant, TenantDirectory


class StateUnavailable(LorafleetError):
    """The shared state (PostgreSQL or Redis) cannot be reached or did not answer in time."""


class KeysAreReadOnly(LorafleetError):
    """Keys and tenants cannot be changed through this state (the embedded state's are a file)."""


@dataclass(frozen=True)
class TenantSettings:
    """A tenant as an administrator sets it up; its keys are separate (`KeyInfo`)."""

    name: str
    adapters: frozenset[str] | None = frozenset()  # None: every adapter
    admin: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_token_budget: int | None = None  # prompt and completion tokens in a calendar month (UTC)
    monthly_cost_budget: float | None = None  # in the currency usage is priced in
    max_rows: int | None = None  # rows of the engine's batch its requests hold at once (None: the server's cap)

    def tenant(self, key_sha256: str) -> Tenant:
        """The gateway's view of this tenant when it calls with the key of that hash."""
        return Tenant(
            name=self.name,
            key_sha256=key_sha256,
            adapters=self.adapters,
            admin=self.admin,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            max_rows=self.max_rows,
        )


@dataclass(frozen=True)
class KeyInfo:
    """What is known of a key without the key: its id (the first 16 hex digits of its SHA-256),
    whose it is and when it stops working."""

    key_id: str
    tenant: str
    created: datetime | None = None  # None: from a keys file, which does not say
    expires: datetime | None = None
    revoked: datetime | None = None


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: `key` is shown once, to whoever asked for it, and stored nowhere."""

    key: str
    info: KeyInfo


@dataclass(frozen=True)
class UsageRow:
    """One tenant's use of one model (an adapter, or the base) on one day (UTC)."""

    day: date
    tenant: str | None  # None: a server without keys
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float = 0.0


@dataclass(frozen=True)
class Prices:
    """What tokens cost, per million, in one currency: as an API bills them and as `lorafleet cost`
    takes them (--api-input-price, --api-output-price). Usage is priced when it is logged."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


FREE = Prices()  # usage counted in tokens only


class ServingState(Protocol):
    """What the gateway asks of its state. Window methods return what the embedded `Tenant`
    methods return, so that both implementations decide alike (tests/serve/test_shared_state.py
    holds them to each other)."""

    # Whether writes wait on another server (a commit to PostgreSQL): the gateway then makes them
    # off the event loop, where they would hold up every other request.
    remote: bool

    @property
    def keys_required(self) -> bool:
        """Whether a caller needs a key (without a keys file the embedded state serves loopback
        callers without one; the shared state always needs one)."""
        ...

    @property
    def unavailable(self) -> Mapping[tuple[str, str], int]:
        """How often a store could not be reached, by (store, what was done): for /metrics."""
        ...

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant whose key this is (None: no such key, revoked or expired)."""
        ...

    def count_request(self, tenant: Tenant) -> float | None:
        """Count a request against the tenant's requests per minute: None when counted, or the
        seconds until one is allowed (a full request window, or a spent token window).
        StateUnavailable when it cannot be served now (the shared state's failure policy)."""
        ...

    def over_budget(self, tenant: Tenant) -> str | None:
        """Why the tenant may not spend more this month (its monthly token or cost budget is
        used up), or None."""
        ...

    def reserve_tokens(self, tenant: Tenant, tokens: int) -> tuple[object | None, float]:
        """Hold `tokens` against the tenant's tokens per minute: (the reservation, 0), or (None,
        seconds to wait) when they do not fit. The reservation is opaque: settle it."""
        ...

    def settle_tokens(self, tenant: Tenant, reservation: object | None, tokens: int) -> None:
        """What the request really used: its reservation becomes that."""
        ...

    def log_request(self, record: RequestRecord) -> None:
        """The request log's row, and the tenant's usage counted with it."""
        ...

    def usage(self, since: date, tenant: str | None = None) -> list[UsageRow]:
        """Usage per day, tenant and model from `since` (UTC) on, oldest first."""
        ...

    def import_keys_file(self, directory: TenantDirectory) -> int:
        """Take in the keys file in force, at start and on each reload (the embedded state reads
        it as it is; the shared state adds its tenants and keys); returns the keys added."""
        ...

    def tenants(self) -> list[TenantSettings]: ...

    def put_tenant(self, settings: TenantSettings) -> None:
        """Create the tenant, or replace its settings (its keys stay)."""
        ...

    def keys(self, tenant: str | None = None) -> list[KeyInfo]: ...

    def create_key(self, tenant: str, expires: datetime | None = None) -> IssuedKey: ...

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke the key with this id (KeyError when there is none); every replica refuses it
        within a second."""
        ...

    def rotate_key(self, key_id: str) -> IssuedKey:
        """A new key for the same tenant and expiry, the old one revoked at once."""
        ...

    def close(self) -> None: ...


def without_password(url: str) -> str:
    """A database URL fit for a message or a log: its password left out."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.partition(':')[0]}{at}{host}" if at else url


class StateDirectory:
    """A serving state seen as a keys file's directory is read (`authenticate`, `tenants`): for
    readers written against the keys file, such as the console, so that on the shared state they
    check callers against the keys in force there (a key revoked there is refused) and list them."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    def authenticate(self, key: str | None) -> Tenant | None:
        return self.state.authenticate(key)

    @property
    def tenants(self) -> list[Tenant]:
        """One per usable key, as a keys file has one per entry (named by the key's id)."""
        settings = {tenant.name: tenant for tenant in self.state.tenants()}
        usable = [key for key in self.state.keys() if key.revoked is None and key.tenant in settings]
        return [settings[key.tenant].tenant(key.key_id) for key in usable]
