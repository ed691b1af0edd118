"""Every request, recorded in the fleet's SQLite database: who, which adapter, tokens, latency, status.

Content (prompt and reply) is stored only when the operator asks for it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
    content: dict | None = None


class RequestLog:
    def __init__(self, path: str | Path, log_content: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_content = log_content
        self._lock = threading.Lock()
        # Owner-only: the log names tenants and, with --log-content, holds what they sent. SQLite
        # gives its -wal and -shm files the database's mode.
        self.path.touch(mode=0o600, exist_ok=True)
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self._db.commit()

    def record(self, entry: RequestRecord) -> None:
        content = json.dumps(entry.content) if self.log_content and entry.content is not None else None
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
            content,
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO requests (time, request_id, tenant, model, prompt_tokens, completion_tokens,"
                " latency_ms, status, error, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _utf8(text: str | None) -> str | None:
    """`text` with any lone surrogate a client sent replaced by "?" (SQLite stores UTF-8 only)."""
    return text.encode("utf-8", errors="replace").decode("utf-8") if text is not None else None
