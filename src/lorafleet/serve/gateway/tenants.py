"""Who may call what: API keys (kept only as SHA-256 hashes), tenants' adapters, rate limits.

KEYS.yaml:
    tenants:
      - name: finance-team
        key_sha256: 9f86d0...          # or `key: sk-...` (hashed on load; prefer the hash)
        adapters: [finance]            # or "*"
        requests_per_minute: 60
        tokens_per_minute: 20000
        max_rows: 8                    # of the engine's batch at once (default: lorafleet serve --max-tenant-rows)
      - name: ops
        key_sha256: ...
        adapters: "*"
        admin: true                    # may load and unload adapters
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.config import read_yaml
from lorafleet.errors import ConfigError

WINDOW_SECONDS = 60.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(eq=False)  # identity: a reservation is settled in place, never compared by value
class Reservation:
    """Tokens a request holds in its tenant's window: the most it can use until it has ended,
    then what it used."""

    time: float
    tokens: int
    counted: bool = True  # still inside the window (its tokens in the window's total)


class TokenWindow:
    """The tokens a tenant used in the last minute, with their running total: reserving, settling
    and expiring are O(1) amortised, however many requests the window holds."""

    def __init__(self) -> None:
        self._entries: deque[Reservation] = deque()
        self.total = 0

    def add(self, tokens: int, now: float) -> Reservation:
        entry = Reservation(now, tokens)
        self._entries.append(entry)
        self.total += tokens
        return entry

    def settle(self, reservation: Reservation, tokens: int) -> None:
        if reservation.counted:  # one that has left the window no longer counts
            self.total += tokens - reservation.tokens
        reservation.tokens = tokens

    def expire(self, now: float) -> None:
        while self._entries and self._entries[0].time <= now - WINDOW_SECONDS:
            gone = self._entries.popleft()
            gone.counted = False
            self.total -= gone.tokens

    def seconds_until_room(self, now: float) -> float:
        """Until the oldest entry leaves the window."""
        return max(self._entries[0].time + WINDOW_SECONDS - now, 0.0) if self._entries else 0.0


@dataclass
class Tenant:
    name: str
    key_sha256: str
    adapters: frozenset[str] | None  # None: every adapter
    admin: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_rows: int | None = None  # rows of the engine's batch its requests hold at once (None: the server's cap)
    _requests: deque[float] = field(default_factory=deque, repr=False)
    _tokens: TokenWindow = field(default_factory=TokenWindow, repr=False)

    @property
    def key_id(self) -> str:
        """Names the key in logs: the first 16 hex digits of its SHA-256 (the key cannot be recovered)."""
        return self.key_sha256[:16]

    def may_use(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters

    def retry_after(self, now: float | None = None) -> float | None:
        """Seconds until a request is allowed again, or None if it is allowed now."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        waits = []
        if self.requests_per_minute is not None and len(self._requests) >= self.requests_per_minute:
            waits.append(self._requests[0] + WINDOW_SECONDS - now)
        if self.tokens_per_minute is not None and self._tokens.total >= self.tokens_per_minute:
            waits.append(self._tokens.seconds_until_room(now))
        return max(waits) if waits else None

    def record_request(self, now: float | None = None) -> None:
        self._requests.append(time.monotonic() if now is None else now)

    def record_tokens(self, tokens: int, now: float | None = None) -> None:
        self._tokens.add(tokens, time.monotonic() if now is None else now)

    def reserve(self, tokens: int, now: float | None = None) -> tuple[Reservation | None, float]:
        """Hold `tokens` against the per-minute limit before a request runs: (the reservation, 0),
        or (None, seconds to wait) when they do not fit. A request larger than the whole limit
        never fits (`exceeds_allowance`: the gateway refuses it before it gets here)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if self.tokens_per_minute is not None and self._tokens.total + tokens > self.tokens_per_minute:
            return None, self._tokens.seconds_until_room(now)
        return self._tokens.add(tokens, now), 0.0

    def exceeds_allowance(self, tokens: int) -> bool:
        """More tokens than the tenant may use in a whole minute: no wait would let them run."""
        return self.tokens_per_minute is not None and tokens > self.tokens_per_minute

    def settle(self, reservation: Reservation | None, tokens: int) -> None:
        """What a finished request really used: its reservation becomes that (or it is recorded)."""
        if reservation is None:
            self.record_tokens(tokens)
        else:
            self._tokens.settle(reservation, tokens)

    def _expire(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - WINDOW_SECONDS:
            self._requests.popleft()
        self._tokens.expire(now)


class TenantDirectory:
    def __init__(self, tenants: list[Tenant], source: Path | None = None) -> None:
        self.tenants = tenants
        self.source = source  # the keys file they were read from
        self.source_sha256 = hashlib.sha256(source.read_bytes()).hexdigest() if source else None

    def reloaded(self) -> TenantDirectory:
        """The keys file read again (ConfigError if it is now invalid); a tenant whose name and key
        are unchanged keeps its rate-limit windows."""
        if self.source is None:
            raise ConfigError("these tenants were not read from a keys file, so there is nothing to reload")
        fresh = load_tenants(self.source)
        known = {(tenant.name, tenant.key_sha256): tenant for tenant in self.tenants}
        for tenant in fresh.tenants:
            previous = known.get((tenant.name, tenant.key_sha256))
            if previous is not None:
                tenant._requests, tenant._tokens = previous._requests, previous._tokens
        return fresh

    def describe(self) -> dict:
        """What the audit log records of the keys in force: the file's hash and who may do what."""
        return {
            "file": str(self.source) if self.source else None,
            "sha256": self.source_sha256,
            "tenants": {t.name: {"key_id": t.key_id, "admin": t.admin} for t in self.tenants},
        }

    def check_adapters(self, served: set[str], base_names: set[str]) -> None:
        """A tenant granted an adapter the server does not have is a typo in the keys file, which
        would otherwise show only as that tenant's 404s: an error naming the tenant and the adapter.
        The base's names are allowed (every tenant may use the base)."""
        for tenant in self.tenants:
            for adapter in sorted((tenant.adapters or set()) - served - base_names):
                raise ConfigError(
                    f"{self.source or 'keys'}: tenant {tenant.name!r} may use adapter {adapter!r}, which is not "
                    f"served here; the fleet's adapters: {', '.join(sorted(served)) or 'none'}. Fix the name, or "
                    "load the adapter and then reload the keys"
                )

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key:
            return None
        digest = hash_key(key)
        for tenant in self.tenants:
            if hmac.compare_digest(tenant.key_sha256, digest):
                return tenant
        return None


def load_tenants(path: str | Path) -> TenantDirectory:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"keys file {path} does not exist")
    raw = read_yaml(path, "keys file") or {}
    entries = raw.get("tenants") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected 'tenants:' with a list of tenants")
    tenants = [_tenant(entry, f"{path}: tenants[{i}]") for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for tenant in tenants:
        if tenant.key_sha256 in seen:
            raise ConfigError(f"{path}: two tenants share a key (second: {tenant.name})")
        seen.add(tenant.key_sha256)
    return TenantDirectory(tenants, path)


_FIELDS = {"name", "key", "key_sha256", "adapters", "admin", "requests_per_minute", "tokens_per_minute", "max_rows"}


def _tenant(entry: object, where: str) -> Tenant:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}: a tenant needs a 'name'")
    where = f"{where} ({entry['name']})"
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}; known: {', '.join(sorted(_FIELDS))}")
    if ("key" in entry) == ("key_sha256" in entry):
        raise ConfigError(f"{where}: give exactly one of 'key' or 'key_sha256'")
    digest = hash_key(str(entry["key"])) if "key" in entry else str(entry["key_sha256"]).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}: key_sha256 must be 64 hex digits (lorafleet keys hash KEY prints it)")
    adapters = entry.get("adapters", [])
    if adapters != "*" and not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
        raise ConfigError(f'{where}: adapters must be a list of adapter names or "*"')
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):  # `admin: "false"` is a string, and a string is true
        raise ConfigError(f"{where}: admin must be true or false, not {admin!r}")
    limits = {}
    for name in ("requests_per_minute", "tokens_per_minute", "max_rows"):
        value = entry.get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # `tokens_per_minute: 2e4` is a float to YAML, and a whole number to the reader
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: {name} must be a positive integer")
        limits[name] = value
    return Tenant(
        name=entry["name"],
        key_sha256=digest,
        adapters=None if adapters == "*" else frozenset(adapters),
        admin=admin,
        **limits,
    )
