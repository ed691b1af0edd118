"""The Audit page's facts: whether the fleet's hash chain verifies and, where it does not, the
first line that breaks it (as `lorafleet audit verify` says it); the newest entries, filtered by
tenant, adapter or event, each marked when its own hash no longer matches its content; and the
same selection exported as JSON lines, CEF or syslog (governance/export.py's formats).

Entries are read newest first, segment by segment, and reading stops once enough have matched,
so a page on a long log costs the newest month or two, not the whole chain; verifying does read
the whole chain, and is cached until a segment changes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import AuditError
from lorafleet.governance.audit import audit_dir, entry_hash, list_segments, verify_chain
from lorafleet.governance.export import format_entry

MAX_ENTRIES = 500


@dataclass(frozen=True)
class EntryFilter:
    tenant: str = ""
    adapter: str = ""
    event: str = ""  # a prefix: "serve." matches every serving event

    def matches(self, entry: dict) -> bool:
        data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
        if self.event and not str(entry.get("event", "")).startswith(self.event):
            return False
        if self.tenant and data.get("tenant") != self.tenant:
            return False
        return not self.adapter or self.adapter in _adapters_named(data)


def _adapters_named(data: dict) -> set[str]:
    named = {str(data[key]) for key in ("adapter", "name", "model") if isinstance(data.get(key), str)}
    if isinstance(data.get("adapters"), dict | list):
        named |= {str(name) for name in data["adapters"]}
    return named


class AuditView:
    def __init__(self, fleet_dir: Path) -> None:
        self.directory = audit_dir(fleet_dir)
        self._verified: tuple[tuple, dict] | None = None
        self._lock = threading.Lock()

    def verification(self) -> dict:
        """{"valid": True, entries, first_seq, last_seq} or {"valid": False, "problem": where and what}."""
        signature = self._signature()
        with self._lock:
            if self._verified is not None and self._verified[0] == signature:
                return self._verified[1]
        if not signature:
            result = {"valid": None, "problem": f"{self.directory}: no audit log yet"}
        else:
            try:
                report = verify_chain(self.directory)
                result = {
                    "valid": True,
                    "entries": report.entries,
                    "first_seq": report.first_seq,
                    "last_seq": report.last_seq,
                }
            except AuditError as err:
                result = {"valid": False, "problem": str(err)}
        with self._lock:
            self._verified = (signature, result)
        return result

    def _signature(self) -> tuple:
        head = self.directory / "head.json"
        files = [*list_segments(self.directory), *([head] if head.exists() else [])]
        return tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files)

    def entries(self, selection: EntryFilter, limit: int = 100) -> list[dict]:
        """The newest `limit` entries that match, newest first, each with `intact`: whether its
        hash still matches its content, and `where`: its file and line."""
        found = []
        for entry in self._newest_first():
            if selection.matches(entry):
                found.append(entry)
                if len(found) >= min(limit, MAX_ENTRIES):
                    break
        return found

    def export(self, selection: EntryFilter, fmt: str, limit: int = MAX_ENTRIES) -> Iterator[str]:
        for entry in reversed(self.entries(selection, limit)):
            yield format_entry({key: value for key, value in entry.items() if key not in ("intact", "where")}, fmt)

    def _newest_first(self) -> Iterator[dict]:
        for segment in reversed(list_segments(self.directory)):
            lines = segment.read_bytes().decode("utf-8", errors="replace").splitlines()
            for number in range(len(lines), 0, -1):
                entry = _parsed(lines[number - 1])
                if entry is not None:
                    yield entry | {"where": f"{segment.name}:{number}", "intact": _intact(entry)}


def _parsed(text: str) -> dict | None:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


def _intact(entry: dict) -> bool:
    try:
        return entry_hash(entry) == entry.get("hash")
    except (TypeError, ValueError):
        return False
