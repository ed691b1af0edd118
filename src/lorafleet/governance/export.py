"""The audit log as a SIEM reads it: each entry in JSON lines, CEF or RFC 5424 syslog, read in
chain order from any sequence number, and followed as the chain grows.

Every exported entry carries its position (`seq`) and its hash with the hash of the entry before
it (`prev`), so the copy a SIEM keeps proves on its own that nothing was dropped (a gap in `seq`)
or reordered (a `prev` that is not the hash before it), and `lorafleet audit verify` checks a
JSONL copy line by line.

`ChainReader` reads the segments from where it left off (a byte offset, not a re-read) and
checks each entry as it reads it: its hash, and that it follows the one before. A log that does
not verify stops the export with an AuditError naming the line; a copy of a broken chain must
never look like a good one. `Cursor` is the last entry delivered, written atomically after each
delivery, so a restarted export resumes after it: nothing lost, nothing sent twice (a cursor whose
entry no longer has its recorded hash is an error: the log was rewritten since).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lorafleet
from lorafleet.errors import AuditError
from lorafleet.governance.audit import audit_dir, entry_hash, list_segments, parse_time

FORMATS = ("jsonl", "cef", "syslog")
# RFC 5424: facility 13 (log audit); severity 6 (informational), 4 (warning) for failures.
SYSLOG_FACILITY = 13
# The SD-ID of our structured data. 32473 is the enterprise number IANA reserves for examples
# (RFC 5612): lorafleet has no number of its own, and a collector matches on the name.
SD_ID = "lorafleet@32473"
BOM = "\ufeff"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark


def jsonl_line(entry: dict) -> str:
    """The entry exactly as the log stores it (a copy `lorafleet audit verify` checks)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _failure(entry: dict) -> bool:
    return entry["event"].endswith(("failed", "_failed"))


def cef_line(entry: dict) -> str:
    """ArcSight Common Event Format: the event as signature and name, the time as `rt` (milliseconds
    since the epoch), the chain
    position as `externalId`, the hashes as custom strings, the data as JSON in `msg`."""
    header = [
        "CEF:0",
        "lorafleet",
        "lorafleet",
        lorafleet.__version__,
        entry["event"],
        entry["event"],
        "5" if _failure(entry) else "3",
    ]
    extension = {
        "rt": round(parse_time(entry["time"]).timestamp() * 1000),
        "externalId": entry["seq"],
        "cs1Label": "hash",
        "cs1": entry["hash"],
        "cs2Label": "prev",
        "cs2": entry["prev"],
        "msg": json.dumps(entry["data"], sort_keys=True, separators=(",", ":"), ensure_ascii=False),
    }
    fields = " ".join(f"{key}={_cef_value(str(value))}" for key, value in extension.items())
    return "|".join(_cef_header(str(part)) for part in header) + "|" + fields


def _cef_header(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _cef_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n")


def syslog_line(entry: dict, hostname: str | None = None) -> str:
    """RFC 5424: <PRI>1 TIMESTAMP HOSTNAME lorafleet - MSGID [lorafleet@32473 seq hash prev] MSG,
    the event as MSGID and the whole entry, as stored, as MSG."""
    severity = 4 if _failure(entry) else 6
    host = _printable(hostname or socket.gethostname(), 255) or "-"
    structured = f'[{SD_ID} seq="{entry["seq"]}" hash="{entry["hash"]}" prev="{entry["prev"]}"]'
    return (
        f"<{SYSLOG_FACILITY * 8 + severity}>1 {entry['time']} {host} lorafleet - "
        f"{_printable(entry['event'], 32) or '-'} {structured} {BOM}{jsonl_line(entry)}"
    )


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields: printable US-ASCII without spaces, at most `limit` characters."""
    return "".join(char for char in text if 33 <= ord(char) <= 126)[:limit]


def format_entry(entry: dict, fmt: str) -> str:
    if fmt == "jsonl":
        return jsonl_line(entry)
    if fmt == "cef":
        return cef_line(entry)
    if fmt == "syslog":
        return syslog_line(entry)
    raise AuditError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


class ChainReader:
    """Reads the entries after `after_seq`, in chain order, checking each one, from where the
    previous read stopped; `read()` again returns what was appended since."""

    def __init__(self, path: str | Path, after_seq: int = 0, after_hash: str | None = None) -> None:
        self.directory = audit_dir(path)
        self.after_seq, self.after_hash = after_seq, after_hash
        self.last: dict | None = None  # the entry read last, whatever its seq
        self._segment: Path | None = None
        self._offset = 0
        self._line = 0

    def read(self, up_to_seq: int | None = None) -> list[dict]:
        """The complete entries appended since the last read (at most up to `up_to_seq`)."""
        found = []
        for entry in self._entries():
            if entry["seq"] > self.after_seq:
                found.append(entry)
            elif entry["seq"] == self.after_seq and self.after_hash and entry["hash"] != self.after_hash:
                raise AuditError(
                    f"{self.directory}: entry seq {entry['seq']} has hash {entry['hash'][:16]}..., not the "
                    f"{self.after_hash[:16]}... the export recorded when it delivered it: the log was rewritten since"
                )
            if up_to_seq is not None and entry["seq"] >= up_to_seq:
                break
        return found

    def _entries(self) -> Iterator[dict]:
        while True:
            segments = list_segments(self.directory)
            if self._segment is None:
                if not segments:
                    return
                self._segment = segments[0]
            yield from self._read_segment()
            later = [segment for segment in segments if segment.name > self._segment.name]
            if not later:
                return
            self._segment, self._offset, self._line = later[0], 0, 0

    def _read_segment(self) -> Iterator[dict]:
        with self._segment.open("rb") as handle:
            handle.seek(self._offset)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    return  # being written: read it next time
                self._offset += len(raw)
                self._line += 1
                yield self._checked(raw.decode("utf-8", errors="replace"))

    def _checked(self, text: str) -> dict:
        where = f"{self._segment}:{self._line}"
        try:
            entry = json.loads(text)
            complete = {"seq", "hash", "prev", "event", "time", "data"} <= set(entry)
        except (json.JSONDecodeError, TypeError):
            complete = False
        if not complete:
            raise AuditError(f"{where}: not a complete audit entry; run `lorafleet audit verify` and keep the log")
        if entry_hash(entry) != entry["hash"]:
            raise AuditError(f"{where}: entry seq {entry['seq']} was changed after it was written (hash mismatch)")
        last = self.last
        if last is not None and (entry["prev"] != last["hash"] or entry["seq"] != last["seq"] + 1):
            raise AuditError(f"{where}: entry seq {entry['seq']} does not follow entry seq {last['seq']}")
        self.last = entry
        return entry


@dataclass
class Cursor:
    """The last entry delivered to one destination, kept in a small JSON file."""

    path: Path
    seq: int = 0
    hash: str | None = None

    @staticmethod
    def load(path: str | Path) -> Cursor:
        path = Path(path)
        if not path.exists():
            return Cursor(path)
        try:
            raw = json.loads(path.read_text())
            return Cursor(path, int(raw["seq"]), raw["hash"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AuditError(f"{path}: not an export position ({err}); delete it and pass --from-seq") from err

    def advance(self, entry: dict) -> None:
        self.seq, self.hash = entry["seq"], entry["hash"]
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps({"seq": self.seq, "hash": self.hash}) + "\n")
        os.replace(partial, self.path)


def shipping_cursor(fleet_dir: str | Path, destination: str) -> Path:
    """Where the server keeps its position for one destination, in the fleet's audit directory."""
    return audit_dir(fleet_dir) / f"shipped-{hashlib.sha256(destination.encode()).hexdigest()[:16]}.json"
