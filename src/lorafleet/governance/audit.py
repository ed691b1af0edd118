"""The audit log: an append-only, hash-chained record of what the fleet did.

Every entry is one JSON line holding the SHA-256 of the entry before it, so an edited, deleted,
inserted or reordered line breaks the chain at that line. Lines live in monthly segments
(`<fleet>/audit/YYYY-MM.jsonl`, so retention can drop whole old months) that read as one chain;
`head.json` names the newest entry, so cutting whole lines off the end is caught too. Anyone who
can write the directory can still rewrite the chain from some point on and recompute every hash:
signed checkpoints (governance/signing.py), kept where that writer cannot reach, close that gap.

Appends are safe across processes and threads (the serving workers and a training run write the
same log): each holds an exclusive `fcntl` lock on `audit/lock` while it reads the chain's tail
and writes its line. Only hashes and counts are logged unless the operator asks for content.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lorafleet.errors import AuditError

GENESIS = "0" * 64
SEGMENT_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9].jsonl"


def audit_dir(path: str | Path) -> Path:
    """The audit directory of a fleet directory (or `path` itself when it is one)."""
    path = Path(path)
    return path if path.name == "audit" or list_segments(path) else path / "audit"


def canonical(entry: dict) -> bytes:
    """The bytes an entry's hash covers: sorted keys, no spaces, the `hash` field left out."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def utc_time(seconds: float) -> str:
    """A Unix time in the log's format."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time or date; naive values are UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise AuditError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-30 or 2026-11-30T12:00:00Z)") from err
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class AuditLog:
    """Appends entries to the hash chain in `<fleet_dir>/audit/`."""

    def __init__(self, fleet_dir: str | Path) -> None:
        self.directory = audit_dir(fleet_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()

    def append(self, event: str, data: dict) -> dict:
        """Add one entry (`event` names what happened, e.g. "train.start"); returns it as written."""
        return self.append_all([(event, data)])[0]

    def append_all(self, events: list[tuple[str, dict]]) -> list[dict]:
        """Add several entries under one lock and one update of head.json (which costs a rename:
        milliseconds on ext4), so a busy server's writer keeps up with any request rate."""
        with self._thread_lock, self._file_lock():
            seq, prev = self._tail()
            written = []
            for event, data in events:
                entry = {"seq": seq + 1, "time": utc_now(), "event": event, "data": data, "prev": prev}
                entry["hash"] = entry_hash(entry)
                seq, prev = entry["seq"], entry["hash"]
                written.append(entry)
            segment = self._segment_for(written[-1]["time"])
            lines = "".join(
                json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for e in written
            )
            # One write() on an O_APPEND descriptor: lines are never interleaved with another writer's.
            descriptor = os.open(segment, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, lines.encode())
            finally:
                os.close(descriptor)
            _write_head(self.directory, seq, prev)
            return written

    def _file_lock(self):
        return _Flock(self.directory / "lock")

    def _tail(self) -> tuple[int, str]:
        """(seq, hash) of the newest entry, read from the log itself; (0, GENESIS) when empty."""
        segments = list_segments(self.directory)
        for segment in reversed(segments):
            line = _last_line(segment)
            if line is not None:
                try:
                    entry = json.loads(line)
                    return entry["seq"], entry["hash"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise AuditError(
                        f"{segment}: the last line is not a complete audit entry, so nothing can be chained "
                        "to it; run `lorafleet audit verify` on the directory and keep the log as evidence"
                    ) from err
        return 0, GENESIS

    def _segment_for(self, time: str) -> Path:
        month = self.directory / f"{time[:7]}.jsonl"
        segments = list_segments(self.directory)
        # A clock set back never writes into an older month than the newest segment.
        return max([month, *segments[-1:]], key=lambda path: path.name)


class _Flock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)


def list_segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(SEGMENT_GLOB))


def _last_line(path: Path) -> str | None:
    """The last line of `path`, read backwards in blocks (segments grow large)."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        if end == 0:
            return None
        block, data = 1 << 16, b""
        position = end
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
            if data.count(b"\n") >= 2 or (position == 0 and data):
                break
        return data.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")


def _write_head(directory: Path, seq: int, digest: str) -> None:
    partial = directory / "head.json.partial"
    partial.write_text(json.dumps({"seq": seq, "hash": digest}) + "\n")
    os.replace(partial, directory / "head.json")


def read_head(directory: Path) -> dict | None:
    path = directory / "head.json"
    return json.loads(path.read_text()) if path.exists() else None


# --- reading and verifying ------------------------------------------------------------------


@dataclass
class Line:
    where: str  # file:line
    text: str


def read_lines(path: Path) -> Iterator[Line]:
    """Every line of an audit directory (its segments in order) or of one exported file."""
    files = list_segments(path) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                text = raw.decode("utf-8", errors="replace")
                if not text.endswith("\n"):
                    text += "\0"  # a cut-off last line: never a valid entry
                yield Line(f"{file}:{number}", text.rstrip("\n"))


@dataclass
class VerifyReport:
    entries: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str
    hashes: dict[int, str]  # seq -> hash, for checking signed checkpoints


def verify_chain(path: str | Path) -> VerifyReport:
    """Check every line of an audit directory (or an exported file) and raise AuditError naming
    the first bad entry: a line whose hash does not match its content (edited), whose `prev` is
    not the hash of the line before it (deleted, inserted, reordered), a sequence gap, a cut-off
    line, or entries missing after the last one (truncated: `head.json` names a later entry)."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path} does not exist; pass a fleet directory, its audit/ directory or an exported file")
    path = audit_dir(path) if path.is_dir() else path
    exported = path.is_file()
    previous: dict | None = None
    first: tuple[dict, Line] | None = None
    hashes: dict[int, str] = {}
    pruned: set[tuple[int, str]] = set()  # (seq, prev) of each first entry kept by retention
    for line in read_lines(path):
        entry = _parse(line)
        if entry["event"] == "audit.pruned":
            pruned.add((entry["data"].get("kept_from_seq"), entry["data"].get("kept_from_prev")))
        if previous is None:
            first = (entry, line)
        elif entry["prev"] != previous["hash"] or entry["seq"] != previous["seq"] + 1:
            raise AuditError(
                f"{line.where}: entry seq {entry['seq']} does not follow entry seq {previous['seq']} "
                "(an entry was deleted, inserted or moved here)"
            )
        hashes[entry["seq"]] = entry["hash"]
        previous = entry
    if first is None or previous is None:
        raise AuditError(f"{path}: no audit entries")
    if not exported:
        _check_start(*first, pruned)
        _check_head(path, previous)
    return VerifyReport(len(hashes), first[0]["seq"], previous["seq"], previous["hash"], hashes)


def _parse(line: Line) -> dict:
    try:
        entry = json.loads(line.text)
        fields_ok = isinstance(entry, dict) and {"seq", "time", "event", "data", "prev", "hash"} <= set(entry)
    except json.JSONDecodeError:
        fields_ok = False
    if not fields_ok:
        raise AuditError(f"{line.where}: not a complete audit entry (edited or cut off)")
    if entry_hash(entry) != entry["hash"]:
        raise AuditError(f"{line.where}: entry seq {entry['seq']} was changed after it was written (hash mismatch)")
    return entry


def _check_start(entry: dict, line: Line, pruned: set[tuple[int, str]]) -> None:
    """The log starts at the first entry ever written, or where retention deleted up to."""
    if entry["seq"] == 1 and entry["prev"] == GENESIS or (entry["seq"], entry["prev"]) in pruned:
        return
    raise AuditError(
        f"{line.where}: the log starts at entry seq {entry['seq']}, not 1, and no audit.pruned entry "
        "records deleting the ones before it: earlier entries were removed"
    )


def _check_head(directory: Path, last: dict) -> None:
    head = read_head(directory)
    if head is None:
        raise AuditError(
            f"{directory}/head.json is missing; it names the newest entry, so truncation cannot be ruled out"
        )
    if head["seq"] > last["seq"]:
        raise AuditError(
            f"{directory}: the log ends at entry seq {last['seq']} but head.json names seq {head['seq']}: "
            f"entries {last['seq'] + 1}..{head['seq']} were cut off (truncated)"
        )


# --- export and retention -------------------------------------------------------------------


def export_entries(path: str | Path, out: str | Path, since: str | None = None, until: str | None = None) -> int:
    """Write the entries with since <= time < until, exactly as stored, to `out` (a JSONL file a
    verifier checks on its own: each line still chains to the one before). Returns the count."""
    report = verify_chain(path)  # never export from a broken chain
    start = parse_time(since) if since else None
    end = parse_time(until) if until else None
    count = 0
    with Path(out).open("w") as handle:
        for line in read_lines(audit_dir(path) if Path(path).is_dir() else Path(path)):
            moment = parse_time(json.loads(line.text)["time"])
            if (start is None or moment >= start) and (end is None or moment < end):
                handle.write(line.text + "\n")
                count += 1
    if count == 0 and report.entries:
        Path(out).unlink()
        raise AuditError(f"no audit entries between {since or 'the start'} and {until or 'now'}")
    return count


def prune(fleet_dir: str | Path, keep_days: int, now: datetime | None = None) -> list[Path]:
    """Delete whole monthly segments whose every entry is older than `keep_days`, then record an
    `audit.pruned` entry. The first kept entry's `prev` still names the last deleted one, which the
    pruned entry records, so the chain stays verifiable. Returns the deleted segments."""
    log = AuditLog(fleet_dir)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=keep_days)
    with log._thread_lock, log._file_lock():
        segments = list_segments(log.directory)
        doomed = []
        for segment in segments[:-1]:  # the newest month stays: the chain continues from it
            last = json.loads(_last_line(segment) or "null")
            if last is not None and parse_time(last["time"]) < cutoff:
                doomed.append(segment)
            else:
                break
        if not doomed:
            return []
        first_kept = json.loads(next(iter(read_lines(segments[len(doomed)]))).text)
        for segment in doomed:
            segment.unlink()
    log.append(
        "audit.pruned",
        {
            "deleted_segments": [segment.name for segment in doomed],
            "keep_days": keep_days,
            "kept_from_seq": first_kept["seq"],
            "kept_from_prev": first_kept["prev"],
        },
    )
    return doomed


# The retention period, set by the fleet config (`audit_keep_days`) and stored beside the log so
# that the server and `lorafleet audit prune` apply the same one. Only deletion depends on it, and
# every deletion is itself an entry of the chain (audit.pruned, with the period it applied).
RETENTION_FILE = "retention.json"


def set_retention(fleet_dir: str | Path, keep_days: int) -> None:
    directory = AuditLog(fleet_dir).directory
    partial = directory / (RETENTION_FILE + ".partial")
    partial.write_text(json.dumps({"keep_days": keep_days}) + "\n")
    os.replace(partial, directory / RETENTION_FILE)


def retention_days(fleet_dir: str | Path) -> int | None:
    path = audit_dir(fleet_dir) / RETENTION_FILE
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["keep_days"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise AuditError(f'{path}: expected {{"keep_days": DAYS}}; set audit_keep_days in the fleet config') from err


def apply_retention(fleet_dir: str | Path) -> list[Path]:
    """Prune by the fleet's stored retention period; nothing without one (keep everything)."""
    keep_days = retention_days(fleet_dir)
    return prune(fleet_dir, keep_days) if keep_days is not None else []
