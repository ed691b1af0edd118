"""The audit log: an append-only, hash-chained record of what the fleet did.

Every entry is one JSON line holding the SHA-256 of the entry before it, so an edited, deleted,
inserted or reordered line breaks the chain at that line. Lines live in monthly segments
(`<fleet>/audit/YYYY-MM.jsonl`, so retention can drop whole old months) that read as one chain;
`head.json` names the newest entry, so cutting whole lines off the end is caught too. A log that
starts later than its first entry must say why: an `audit.pruned` entry that the rules below allow
(governance/retention.py deletes; this module checks). Anyone who can write the directory can
still rewrite the chain from some point on and recompute every hash: signed checkpoints
(governance/signing.py), kept where that writer cannot reach, close that gap.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lorafleet.errors import AuditError
from lorafleet.fleet_dir import AUDIT, FleetDir

GENESIS = "0" * 64
SEGMENT_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9].jsonl"
PRUNED, RETENTION, CHECKPOINT = "audit.pruned", "audit.retention", "audit.checkpoint"
MIN_KEEP_DAYS = 1
# A prune dated later than this past the verifier's clock is forged: a date in the future would
# make any month look old enough to delete. An hour allows for clocks that disagree.
CLOCK_SKEW = timedelta(hours=1)


def audit_dir(path: str | Path) -> Path:
    """The audit directory of a fleet directory (or `path` itself when it is one)."""
    path = Path(path)
    return path if path.name == AUDIT or list_segments(path) else FleetDir(path).audit


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


def month_end(month: str) -> datetime:
    """The first instant after the month "YYYY-MM" (UTC)."""
    year, number = int(month[:4]), int(month[5:7])
    return datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)


class AuditLog:
    """Appends entries to the hash chain in `<fleet_dir>/audit/`."""

    def __init__(self, fleet_dir: str | Path, clock: Callable[[], str] = utc_now) -> None:
        self.directory = audit_dir(fleet_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._thread_lock = threading.Lock()

    def append(self, event: str, data: dict) -> dict:
        """Add one entry (`event` names what happened, e.g. "train.start"); returns it as written."""
        return self.append_all([(event, data)])[0]

    def append_all(self, events: list[tuple[str, dict]]) -> list[dict]:
        """Add several entries under one lock and one update of head.json (which costs a rename:
        milliseconds on ext4), so a busy server's writer keeps up with any request rate."""
        with self.exclusive():
            return self.append_held(events)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the log against every other writer, thread or process (read, change, then append)."""
        with self._thread_lock, _Flock(self.directory / "lock"):
            yield

    def append_held(self, events: list[tuple[str, dict]]) -> list[dict]:
        """`append_all` for a caller already inside `exclusive()`."""
        seq, prev = self._tail()
        written = []
        for event, data in events:
            entry = {"seq": seq + 1, "time": self.clock(), "event": event, "data": data, "prev": prev}
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

    def _tail(self) -> tuple[int, str]:
        """(seq, hash) of the newest entry, read from the log itself; (0, GENESIS) when empty."""
        segments = list_segments(self.directory)
        for segment in reversed(segments):
            line = last_line(segment)
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


def last_line(path: Path) -> str | None:
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
    path: Path
    number: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def read_lines(path: Path) -> Iterator[Line]:
    """Every line of an audit directory (its segments in order) or of one exported file."""
    files = list_segments(path) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                text = raw.decode("utf-8", errors="replace")
                if not text.endswith("\n"):
                    text += "\0"  # a cut-off last line: never a valid entry
                yield Line(file, number, text.rstrip("\n"))


@dataclass
class VerifyReport:
    entries: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str
    hashes: dict[int, str]  # seq -> hash, for checking signed checkpoints
    exported: bool = False  # one exported file: it may start and end anywhere
    segment_starts: dict[str, int] = field(default_factory=dict)  # month "YYYY-MM" -> seq of its first entry
    prunes: list[dict] = field(default_factory=list)  # the audit.pruned entries, oldest first
    retention_changes: list[dict] = field(default_factory=list)  # the audit.retention entries, oldest first
    checkpoints: list[dict] = field(default_factory=list)  # the audit.checkpoint entries, oldest first

    @property
    def first_month(self) -> str | None:
        """The month of the segment the log starts in (None for an exported file)."""
        return next((month for month, seq in self.segment_starts.items() if seq == self.first_seq), None)


def verify_chain(path: str | Path, now: datetime | None = None) -> VerifyReport:
    """Check every line of an audit directory (or an exported file) and raise AuditError naming
    the first bad entry: a line whose hash does not match its content (edited), whose `prev` is
    not the hash of the line before it (deleted, inserted, reordered), a sequence gap, a cut-off
    line, entries missing after the last one (truncated: `head.json` names a later entry), or
    entries missing before the first one that no allowed `audit.pruned` entry accounts for."""
    path = Path(path)
    if not path.exists():
        raise AuditError(f"{path} does not exist; pass a fleet directory, its audit/ directory or an exported file")
    path = audit_dir(path) if path.is_dir() else path
    report = VerifyReport(0, None, None, GENESIS, {}, exported=path.is_file())
    previous: dict | None = None
    first: tuple[dict, Line] | None = None
    retention_events: list[tuple[dict, Line]] = []  # audit.retention and audit.pruned, in order
    for line in read_lines(path):
        entry = _parse(line)
        if previous is None:
            first = (entry, line)
        elif entry["prev"] != previous["hash"] or entry["seq"] != previous["seq"] + 1:
            raise AuditError(
                f"{line.where}: entry seq {entry['seq']} does not follow entry seq {previous['seq']} "
                "(an entry was deleted, inserted or moved here)"
            )
        if line.number == 1 and not report.exported:
            report.segment_starts[line.path.stem] = entry["seq"]
        if entry["event"] in (PRUNED, RETENTION):
            retention_events.append((entry, line))
        if entry["event"] == PRUNED:
            report.prunes.append(entry)
        elif entry["event"] == RETENTION:
            report.retention_changes.append(entry)
        elif entry["event"] == CHECKPOINT:
            report.checkpoints.append(entry)
        report.hashes[entry["seq"]] = entry["hash"]
        previous = entry
    if first is None or previous is None:
        raise AuditError(f"{path}: no audit entries")
    report.entries, report.first_seq, report.last_seq, report.last_hash = (
        len(report.hashes),
        first[0]["seq"],
        previous["seq"],
        previous["hash"],
    )
    if not report.exported:
        _check_prunes(retention_events, report, now or datetime.now(UTC))
        _check_start(*first, report.prunes)
        _check_head(path, previous)
    return report


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


def _check_start(entry: dict, line: Line, prunes: list[dict]) -> None:
    """The log starts at the first entry ever written, or where an allowed prune deleted up to."""
    if entry["seq"] == 1 and entry["prev"] == GENESIS:
        return
    if any((p["data"]["kept_from_seq"], p["data"]["kept_from_prev"]) == (entry["seq"], entry["prev"]) for p in prunes):
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


# --- the rules a prune must follow ----------------------------------------------------------


def prune_cutoff(entry: dict) -> datetime:
    """Everything a prune deleted ended before this: its time less the days it kept."""
    return parse_time(entry["time"]) - timedelta(days=entry["data"]["keep_days"])


def _check_prunes(events: list[tuple[dict, Line]], report: VerifyReport, now: datetime) -> None:
    """Every `audit.pruned` entry must have been allowed when it was made: whole months, all older
    than the days it kept, which are at least the retention the log records as in force then."""
    in_force: int | None = None  # days, as the log records them (None: not recorded, or every entry kept)
    for entry, line in events:
        if entry["event"] == RETENTION:
            in_force = entry["data"].get("keep_days")
            continue
        problem = _prune_problem(entry, in_force, report, now)
        if problem:
            raise AuditError(f"{line.where}: the audit.pruned entry seq {entry['seq']} {problem}")
        in_force = entry["data"]["retention_days"]


def _prune_problem(entry: dict, in_force: int | None, report: VerifyReport, now: datetime) -> str | None:
    data = entry["data"]
    missing = {"by", "keep_days", "retention_days", "deleted_segments", "kept_from_seq", "kept_from_prev"} - set(data)
    if missing:
        return f"lacks {', '.join(sorted(missing))}: a prune must say who deleted what under which retention"
    keep, claimed = data["keep_days"], data["retention_days"]
    if not _is_days(keep) or keep < MIN_KEEP_DAYS:
        return f"kept {keep!r} days; retention keeps at least {MIN_KEEP_DAYS} day"
    if parse_time(entry["time"]) > now + CLOCK_SKEW:
        return f"is dated {entry['time']}, in the future: a forged date makes any month look old"
    if in_force is not None and claimed != in_force:
        return f"claims a retention of {claimed} days in force, but the log records {in_force} days"
    if claimed is not None and (not _is_days(claimed) or keep < claimed):
        return f"kept {keep} days, less than the retention of {claimed} days in force"
    return _months_problem(entry, report)


def _months_problem(entry: dict, report: VerifyReport) -> str | None:
    data, cutoff = entry["data"], prune_cutoff(entry)
    months = [_segment_month(name) for name in data["deleted_segments"]]
    if not months or None in months:
        return f"names no deleted monthly segment (YYYY-MM.jsonl) but {data['deleted_segments']!r}"
    young = [month for month in months if month_end(month) > cutoff]
    if young:
        return (
            f"deleted {young[0]}, which ends after {cutoff.isoformat()} ({data['keep_days']} days before the "
            "prune): only whole months older than the retention may be deleted"
        )
    kept = data["kept_from_seq"]
    if not isinstance(kept, int) or kept >= entry["seq"] or kept > report.first_seq:
        return f"says the entries before seq {kept} were deleted, but the log holds seq {report.first_seq}.."
    if kept == report.first_seq:  # the prune the log starts after
        month = report.first_month
        if month is None:
            return f"kept seq {kept} from the middle of a month: part of a month was deleted"
        if max(months) >= month:
            return f"deleted {max(months)}, but the log starts in {month}: part of a month was deleted"
    return None


def _segment_month(name: object) -> str | None:
    if not isinstance(name, str) or not Path(name).match(SEGMENT_GLOB) or not 1 <= int(name[5:7]) <= 12:
        return None
    return name[:7]


def _is_days(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- export ---------------------------------------------------------------------------------


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
