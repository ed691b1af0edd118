"""The PostgreSQL half of the shared serving state: tenants, keys (their SHA-256 only), the request
log and daily usage, in a schema lorafleet creates and migrates itself.

`schema_version` holds the versions applied; `MIGRATIONS[i]` takes the schema from version i to
i + 1, and each replica applies what is missing at start under an advisory lock, so that two
replicas starting together migrate once. A database newer than this lorafleet is refused rather
than guessed at. Keys are random 256-bit strings, so one SHA-256 is as strong as a slow hash
(nothing to brute-force) and lets a key be looked up by its hash; the key itself is shown once,
when it is made, and stored nowhere.

Every change to keys or tenants bumps `state_changes.version` in the same transaction: replicas
poll that one number and reload their directory of keys when it moves (shared_state.py).

A request's row and its usage are written in one transaction before the reply is sent, so a
replica killed after answering has logged what it answered. Each call runs on one connection per
thread (the event loop's, the poller's), reconnected after a failure; a failure raises
`StateUnavailable`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime

import psycopg
from psycopg.rows import dict_row

from lorafleet.errors import ConfigError
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.state import (
    IssuedKey,
    KeyInfo,
    StateUnavailable,
    TenantSettings,
    UsageRow,
    without_password,
)
from lorafleet.serve.gateway.tenants import hash_key

KEY_PREFIX = "sk-lf-"
CONNECT_TIMEOUT_S = 2

MIGRATIONS = [
    # 0 -> 1: tenants, keys, the request log, daily usage, the change counter replicas poll.
    """
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        adapters TEXT[],  -- NULL: every adapter
        admin BOOLEAN NOT NULL DEFAULT false,
        requests_per_minute INTEGER,
        tokens_per_minute INTEGER,
        monthly_token_budget BIGINT,
        monthly_cost_budget DOUBLE PRECISION,
        created TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE api_keys (
        key_sha256 TEXT PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL REFERENCES tenants (name),
        created TIMESTAMPTZ NOT NULL DEFAULT now(),
        expires TIMESTAMPTZ,
        revoked TIMESTAMPTZ
    );
    CREATE TABLE requests (
        id BIGSERIAL PRIMARY KEY,
        time TIMESTAMPTZ NOT NULL DEFAULT now(),
        replica TEXT NOT NULL,
        request_id TEXT NOT NULL,
        tenant TEXT,
        model TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        latency_ms DOUBLE PRECISION NOT NULL,
        status INTEGER NOT NULL,
        error TEXT
    );
    CREATE INDEX requests_time ON requests (time);
    CREATE TABLE usage_daily (
        day DATE NOT NULL,
        tenant TEXT NOT NULL,  -- '': a server without keys
        model TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (day, tenant, model)
    );
    CREATE TABLE state_changes (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), version BIGINT NOT NULL);
    INSERT INTO state_changes (version) VALUES (0);
    """,
    # 1 -> 2: usage priced (lorafleet serve --price-input/--price-output), for monthly cost budgets.
    """
    ALTER TABLE usage_daily ADD COLUMN cost DOUBLE PRECISION NOT NULL DEFAULT 0;
    """,
    # 2 -> 3: a tenant's share of the engine's batch (keys files' max_rows; fair admission).
    """
    ALTER TABLE tenants ADD COLUMN max_rows INTEGER;
    """,
]

_TENANT_COLUMNS = (
    "name, adapters, admin, requests_per_minute, tokens_per_minute, monthly_token_budget, monthly_cost_budget, max_rows"
)


class PostgresStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()  # one connection per thread
        self._connections: list[psycopg.Connection] = []
        self._connections_lock = threading.Lock()
        with self._transaction() as db:
            migrate(db)

    # --- keys and tenants ------------------------------------------------------------------

    def change_version(self) -> int:
        with self._transaction() as db:
            return db.execute("SELECT version FROM state_changes").fetchone()["version"]

    def directory(self) -> tuple[int, list[tuple[str, datetime | None, TenantSettings]]]:
        """The change version and every usable key: (its hash, its expiry, its tenant's settings)."""
        with self._transaction() as db:
            version = db.execute("SELECT version FROM state_changes").fetchone()["version"]
            rows = db.execute(
                "SELECT k.key_sha256, k.expires, t.* FROM api_keys k JOIN tenants t ON t.name = k.tenant"
                " WHERE k.revoked IS NULL"
            ).fetchall()
        return version, [(row["key_sha256"], row["expires"], _settings(row)) for row in rows]

    def tenants(self) -> list[TenantSettings]:
        with self._transaction() as db:
            return [_settings(row) for row in db.execute("SELECT * FROM tenants ORDER BY name")]

    def put_tenant(self, settings: TenantSettings) -> None:
        values = (
            settings.name,
            sorted(settings.adapters) if settings.adapters is not None else None,
            settings.admin,
            settings.requests_per_minute,
            settings.tokens_per_minute,
            settings.monthly_token_budget,
            settings.monthly_cost_budget,
            settings.max_rows,
        )
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO tenants ({_TENANT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET adapters = excluded.adapters, admin = excluded.admin,"
                " requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute,"
                " monthly_token_budget = excluded.monthly_token_budget,"
                " monthly_cost_budget = excluded.monthly_cost_budget, max_rows = excluded.max_rows, updated = now()",
                values,
            )
            _changed(db)

    def keys(self, tenant: str | None = None) -> list[KeyInfo]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM api_keys WHERE %s::text IS NULL OR tenant = %s ORDER BY created, key_id",
                (tenant, tenant),
            ).fetchall()
        return [_key_info(row) for row in rows]

    def create_key(self, tenant: str, expires: datetime | None = None) -> IssuedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._transaction() as db:
            info = self._insert_key(db, tenant, hash_key(key), expires)
        return IssuedKey(key, info)

    def import_key(self, tenant: str, key_sha256: str) -> bool:
        """A key known by its hash (a keys file's): added unless it is known already, revoked or not,
        so that importing the file again never brings a revoked key back. True when added."""
        with self._transaction() as db:
            added = self._insert_key(db, tenant, key_sha256, None, if_new=True)
        return added is not None

    def revoke_key(self, key_id: str) -> KeyInfo:
        with self._transaction() as db:
            row = db.execute(
                "UPDATE api_keys SET revoked = coalesce(revoked, now()) WHERE key_id = %s RETURNING *", (key_id,)
            ).fetchone()
            if row is None:
                raise KeyError(key_id)
            _changed(db)
        return _key_info(row)

    def rotate_key(self, key_id: str) -> IssuedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._transaction() as db:
            old = db.execute(
                "UPDATE api_keys SET revoked = now() WHERE key_id = %s AND revoked IS NULL RETURNING *", (key_id,)
            ).fetchone()
            if old is None:
                raise KeyError(key_id)
            info = self._insert_key(db, old["tenant"], hash_key(key), old["expires"])
        return IssuedKey(key, info)

    def _insert_key(
        self, db: psycopg.Connection, tenant: str, key_sha256: str, expires: datetime | None, if_new: bool = False
    ) -> KeyInfo | None:
        """The key added to `tenant`. With `if_new`, a key the database knows already is left as it
        is and None returned: replicas starting together import one keys file at the same moment, and
        a look-then-insert would let two of them insert the same key (and one die of it)."""
        if db.execute("SELECT 1 FROM tenants WHERE name = %s", (tenant,)).fetchone() is None:
            raise KeyError(tenant)
        row = db.execute(
            "INSERT INTO api_keys (key_sha256, key_id, tenant, expires) VALUES (%s, %s, %s, %s)"
            + (" ON CONFLICT (key_sha256) DO NOTHING" if if_new else "")
            + " RETURNING *",
            (key_sha256, key_sha256[:16], tenant, expires),
        ).fetchone()
        if row is None:
            return None
        _changed(db)
        return _key_info(row)

    # --- requests and usage -----------------------------------------------------------------

    def log_request(self, record: RequestRecord, replica: str, cost: float = 0.0) -> None:
        with self._transaction() as db:
            row = db.execute(
                "INSERT INTO requests (replica, request_id, tenant, model, prompt_tokens, completion_tokens,"
                " latency_ms, status, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " RETURNING (time AT TIME ZONE 'UTC')::date AS day",
                (
                    replica,
                    record.request_id,
                    record.tenant,
                    _text(record.model),
                    record.prompt_tokens,
                    record.completion_tokens,
                    record.latency_ms,
                    record.status,
                    _text(record.error),
                ),
            ).fetchone()
            db.execute(
                "INSERT INTO usage_daily AS u (day, tenant, model, requests, prompt_tokens, completion_tokens, cost)"
                " VALUES (%s, %s, %s, 1, %s, %s, %s) ON CONFLICT (day, tenant, model) DO UPDATE SET"
                " requests = u.requests + 1, prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = u.completion_tokens + excluded.completion_tokens, cost = u.cost + excluded.cost",
                (
                    row["day"],
                    record.tenant or "",
                    _text(record.model) or "",
                    record.prompt_tokens,
                    record.completion_tokens,
                    cost,
                ),
            )

    def usage(self, since: date, tenant: str | None = None) -> list[UsageRow]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM usage_daily WHERE day >= %s AND (%s::text IS NULL OR tenant = %s)"
                " ORDER BY day, tenant, model",
                (since, tenant, tenant),
            ).fetchall()
        return [
            UsageRow(
                row["day"],
                row["tenant"] or None,
                row["model"],
                row["requests"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row["cost"],
            )
            for row in rows
        ]

    def month_to_date(self, tenants: list[str]) -> dict[str, tuple[int, float]]:
        """Each tenant's tokens (prompt and completion) and cost since the month began (UTC)."""
        if not tenants:
            return {}
        with self._transaction() as db:
            rows = db.execute(
                "SELECT tenant, sum(prompt_tokens + completion_tokens) AS tokens, sum(cost) AS cost FROM usage_daily"
                " WHERE day >= date_trunc('month', now() AT TIME ZONE 'UTC')::date AND tenant = ANY(%s)"
                " GROUP BY tenant",
                (tenants,),
            ).fetchall()
        return {row["tenant"]: (int(row["tokens"]), float(row["cost"])) for row in rows}

    def requests(self) -> list[dict]:
        """Every logged request, oldest first (for audits and tests)."""
        with self._transaction() as db:
            return db.execute("SELECT * FROM requests ORDER BY id").fetchall()

    # --- connections ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """This thread's connection in a transaction, committed on leaving; StateUnavailable when
        the database cannot be reached (the connection is dropped and made again next time)."""
        try:
            db = self._connection()
            with db.transaction():
                yield db
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            self._drop_connection()
            raise StateUnavailable(f"PostgreSQL at {without_password(self.url)}: {str(err).strip()}") from err

    def _connection(self) -> psycopg.Connection:
        db = getattr(self._local, "db", None)
        if db is None or db.closed:
            db = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S)
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _drop_connection(self) -> None:
        db = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            db.close()

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()


def migrate(db: psycopg.Connection) -> int:
    """Bring the schema to this lorafleet's version (see the module's docstring); returns it."""
    db.execute("SELECT pg_advisory_xact_lock(hashtext('lorafleet schema'))")
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    current = db.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version").fetchone()["v"]
    if current > len(MIGRATIONS):
        raise ConfigError(
            f"the serving state's database is at schema version {current}, newer than this lorafleet "
            f"knows ({len(MIGRATIONS)}): upgrade lorafleet on this replica to the version the others run"
        )
    for version in range(current, len(MIGRATIONS)):
        db.execute(MIGRATIONS[version])
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (version + 1,))
    return len(MIGRATIONS)


def _changed(db: psycopg.Connection) -> None:
    db.execute("UPDATE state_changes SET version = version + 1")


def _settings(row: dict) -> TenantSettings:
    return TenantSettings(
        name=row["name"],
        adapters=frozenset(row["adapters"]) if row["adapters"] is not None else None,
        admin=row["admin"],
        requests_per_minute=row["requests_per_minute"],
        tokens_per_minute=row["tokens_per_minute"],
        monthly_token_budget=row["monthly_token_budget"],
        monthly_cost_budget=row["monthly_cost_budget"],
        max_rows=row["max_rows"],
    )


def _key_info(row: dict) -> KeyInfo:
    return KeyInfo(row["key_id"], row["tenant"], row["created"], row["expires"], row["revoked"])


def _text(text: str | None) -> str | None:
    """`text` as PostgreSQL stores it: UTF-8 without NUL (a client may send a lone surrogate or \\0)."""
    if text is None:
        return None
    return text.encode("utf-8", errors="replace").decode("utf-8").replace("\x00", "?")
