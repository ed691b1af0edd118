"""Every request, recorded in the fleet's SQLite database: who, which adapter, tokens, latency, status.

Never the content: with `--log-content` the prompt and the reply go to the audit log only, with
personal data replaced (audit_trail.py), so that there is one copy, redacted. The `content`
column stays for databases written before, whose rows may hold content. The fleet's retention
period (`audit_keep_days`) applies here too: `prune_requests` deletes the rows, content and all,
older than it (the server daily, `lorafleet audit prune` on demand).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lorafleet.governance.audit import AuditLog
from lorafleet.governance.registry import DATABASE
from lorafleet.governance.retention import retention_cutoff, who

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT,
    model TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL NOT NULL,
    status INTEGER NOT NULL,
    error TEXT,
    content TEXT
)
"""


@dataclass
class RequestRecord:
    request_id: str
    tenant: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    status: int
    error: str | None = None


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Owner-only: the log names tenants (and older rows may hold what they sent). SQLite
        # gives its -wal and -shm files the database's mode.
        self.path.touch(mode=0o600, exist_ok=True)
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A row is written on the event loop, where an fsync per commit (2.8 ms median, 72 ms at
        # worst, measured on a busy two-core machine) is time every tenant waits. In WAL mode
        # NORMAL syncs at checkpoints only: a power cut may lose the last rows, never corrupt the
        # file; the audit log, appended off the event loop, is the durable record.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._db.commit()

    def record(self, entry: RequestRecord) -> None:
        row = (
            time.time(),
            entry.request_id,
            entry.tenant,
            _utf8(entry.model),
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.latency_ms,
            entry.status,
            _utf8(entry.error),
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO requests (time, request_id, tenant, model, prompt_tokens, completion_tokens,"
                " latency_ms, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def apply_request_retention(fleet_dir: Path, keep_days: int, via: str) -> int:
    """Delete the requests older than `keep_days` from the fleet's request log and record how
    many in its audit log (`request_log.pruned`); returns the count."""
    before = retention_cutoff(keep_days)
    rows = prune_requests(Path(fleet_dir) / DATABASE, before)
    if rows:
        record = {"rows": rows, "keep_days": keep_days, "before": before.isoformat(), "by": who(via)}
        AuditLog(fleet_dir).append("request_log.pruned", record)
    return rows


def prune_requests(database: Path, before: datetime) -> int:
    """Delete the requests logged before `before`; returns how many. A database without a request
    log (a fleet never served) is left alone."""
    if not database.exists():
        return 0
    db = sqlite3.connect(database, timeout=30)
    try:
        has_log = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone()
        if not has_log:
            return 0
        with db:
            return db.execute("DELETE FROM requests WHERE time < ?", (before.timestamp(),)).rowcount
    finally:
        db.close()


def _utf8(text: str | None) -> str | None:
    """`text` with any lone surrogate a client sent replaced by "?" (SQLite stores UTF-8 only)."""
    return text.encode("utf-8", errors="replace").decode("utf-8") if text is not None else None
