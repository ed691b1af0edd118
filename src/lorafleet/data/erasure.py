"""`lorafleet data find`: where one person's identifiers lie in a fleet, and what learned from them.

A data-subject request (GDPR Art. 17) asks a fleet four things, and this module answers each from
what the fleet already records:

- **records**: every line of every training and held-out file the registry knows (each adapter's
  and compressed model's data, its held-out files) that holds one of the person's identifiers,
  as file:line (`data/person.py` matches them);
- **adapters and models**: every registered version whose lineage names such a file, as training
  data (it learned from the records) or held-out data (it was only scored on them), and everything
  initialised, merged or compressed from one that learned;
- **requests**: every row of the request log (`lorafleet.sqlite`, table `requests`, written by the
  gateway's request_log.py) whose content or error holds them;
- **the audit log and checkpoints**: audit entries whose data holds them (the server logs content
  redacted, so normally none), and trainer checkpoints that hold the state of an adapter that
  learned (found by the `train.checkpoint` entries that name it and the checkpoint's SHA-256).

The report names places and kinds, never the identifiers; what the audit log keeps of it
(`audit_summary`) is hashes only: the person's, each record line's and each file's.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.data.person import PersonMatcher, strings_in
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import audit_dir, list_segments, read_lines
from lorafleet.governance.lineage import Lineage, sha256_file, weight_hashes, weights_id
from lorafleet.governance.registry import Registry

TRAINED, EVALUATED = "training", "held-out"


@dataclass
class RecordHit:
    line: int
    kinds: list[str]  # NAME, EMAIL, PHONE, IBAN, ID
    line_sha256: str


@dataclass
class FileHits:
    path: Path
    sha256: str  # the file as it is now
    roles: list[str]  # training, held-out
    records: list[RecordHit] = field(default_factory=list)


@dataclass
class AdapterHit:
    name: str
    id: str
    kind: str  # adapter, model
    directory: Path
    relation: str  # "trained on FILE", "evaluated on FILE", "init_from NAME", ...
    learned: bool  # trained on the records, or made from something that was
    on_disk: bool  # its directory holds exactly these weights now
    withdrawn: bool


@dataclass
class RequestHit:
    row: int
    request_id: str
    time: float
    fields: list[str]  # content, error, model


@dataclass
class AuditHit:
    seq: int
    event: str


@dataclass
class CheckpointHit:
    path: Path
    adapters: list[str]


@dataclass
class ErasureReport:
    person_sha256: str
    files: list[FileHits] = field(default_factory=list)
    adapters: list[AdapterHit] = field(default_factory=list)
    requests: list[RequestHit] = field(default_factory=list)
    audit_entries: list[AuditHit] = field(default_factory=list)
    checkpoints: list[CheckpointHit] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(len(hits.records) for hits in self.files)

    @property
    def empty(self) -> bool:
        return not (self.records or self.adapters or self.requests or self.audit_entries or self.checkpoints)

    def to_json(self) -> dict:
        return {
            "person_sha256": self.person_sha256,
            "records": [
                {"file": str(hits.path), "line": record.line, "kinds": record.kinds, "roles": hits.roles}
                for hits in self.files
                for record in hits.records
            ],
            "adapters": [
                {
                    "name": hit.name,
                    "id": hit.id,
                    "kind": hit.kind,
                    "directory": str(hit.directory),
                    "relation": hit.relation,
                    "learned": hit.learned,
                    "on_disk": hit.on_disk,
                    "withdrawn": hit.withdrawn,
                }
                for hit in self.adapters
            ],
            "requests": [vars(hit) for hit in self.requests],
            "audit_entries": [vars(hit) for hit in self.audit_entries],
            "checkpoints": [{"path": str(hit.path), "adapters": hit.adapters} for hit in self.checkpoints],
        }

    def audit_summary(self) -> dict:
        """What the audit log keeps: hashes, positions and ids, never an identifier."""
        return {
            "person_sha256": self.person_sha256,
            "records": [
                {"file": str(hits.path), "file_sha256": hits.sha256, "line": record.line, "sha256": record.line_sha256}
                for hits in self.files
                for record in hits.records
            ],
            "adapters": [{"name": hit.name, "id": hit.id, "relation": hit.relation} for hit in self.adapters],
            "requests": [hit.request_id for hit in self.requests],
            "audit_entries": [hit.seq for hit in self.audit_entries],
            "checkpoints": [str(hit.path) for hit in self.checkpoints],
        }

    def format_text(self) -> str:
        lines = [f"records: {self.records}"]
        for hits in self.files:
            for record in hits.records:
                lines.append(f"  {hits.path}:{record.line}  {', '.join(record.kinds)}  ({', '.join(hits.roles)})")
        lines.append(f"adapters and models: {len(self.adapters)}")
        for hit in self.adapters:
            state = ["learned" if hit.learned else "scored only", "on disk" if hit.on_disk else "not on disk"]
            state += ["withdrawn"] if hit.withdrawn else []
            lines.append(f"  {hit.name} ({hit.kind} {hit.id[:12]}): {hit.relation}; {', '.join(state)}")
        lines.append(f"requests logged: {len(self.requests)}")
        for hit in self.requests:
            lines.append(f"  row {hit.row} request {hit.request_id}: {', '.join(hit.fields)}")
        lines.append(f"audit entries holding them: {len(self.audit_entries)}")
        for hit in self.audit_entries:
            lines.append(f"  seq {hit.seq} ({hit.event})")
        lines.append(f"checkpoints holding adapters that learned: {len(self.checkpoints)}")
        for hit in self.checkpoints:
            lines.append(f"  {hit.path} ({', '.join(hit.adapters)})")
        return "\n".join(lines)


def find_person(fleet_dir: str | Path, matcher: PersonMatcher) -> ErasureReport:
    """Everything of the fleet in `fleet_dir` that holds the person or learned from them."""
    fleet_dir = Path(fleet_dir)
    report = ErasureReport(matcher.person.sha256)
    registry = Registry.open(fleet_dir)
    try:
        records = registry.all()
        report.files = [hits for hits in _scan_files(known_data_files(records), matcher) if hits.records]
        report.adapters = _affected(registry, records, {hits.path for hits in report.files})
    finally:
        registry.close()
    report.requests = list(_scan_requests(FleetDir(fleet_dir).database, matcher))
    entries = list(_audit_entries(fleet_dir))
    report.audit_entries = [AuditHit(e["seq"], e["event"]) for e in entries if _holds(e["data"], matcher)]
    learned = {hit.name for hit in report.adapters if hit.learned and hit.kind == "adapter"}
    report.checkpoints = _checkpoints_holding(fleet_dir, entries, learned)
    return report


def known_data_files(records: list[Lineage]) -> dict[Path, list[str]]:
    """Every data file the registry names, with its roles (training, held-out)."""
    files: dict[Path, list[str]] = {}
    for lineage in records:
        for path, role in _data_files(lineage):
            roles = files.setdefault(path, [])
            roles += [role] if role not in roles else []
    return files


def _data_files(lineage: Lineage) -> Iterator[tuple[Path, str]]:
    for data in lineage.data:
        yield Path(data.path).resolve(), TRAINED
    for scores in lineage.evaluation.values():
        if scores.get("data"):
            yield Path(scores["data"]).resolve(), EVALUATED
    if lineage.adapter_config.get("eval_data"):
        yield Path(lineage.adapter_config["eval_data"]).resolve(), EVALUATED


def _scan_files(files: dict[Path, list[str]], matcher: PersonMatcher) -> Iterator[FileHits]:
    for path, roles in sorted(files.items()):
        if not path.is_file():
            continue
        hits = FileHits(path, sha256_file(path), roles)
        for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            kinds = _kinds_in_line(line.decode("utf-8", errors="replace"), matcher)
            if kinds:
                hits.records.append(RecordHit(number, kinds, hashlib.sha256(line).hexdigest()))
        yield hits


def _kinds_in_line(line: str, matcher: PersonMatcher) -> list[str]:
    """The kinds of identifier a JSONL line holds, searched in its decoded strings (so that
    "\\u00fc" and "ü" are one letter) and, for a line that is not JSON, in its text."""
    try:
        texts = strings_in(json.loads(line)) if line.strip() else []
    except json.JSONDecodeError:
        texts = [line]
    return sorted({match.kind for text in texts for match in matcher.matches(text)})


def _affected(registry: Registry, records: list[Lineage], files: set[Path]) -> list[AdapterHit]:
    """Every registered version whose lineage names one of `files`, and what was made from those
    that learned from them."""
    withdrawn = registry.withdrawn()
    hits: dict[str, AdapterHit] = {}
    for lineage in records:
        for path, role in _data_files(lineage):
            if path in files and (lineage.id not in hits or role == TRAINED):
                verb = "trained on" if role == TRAINED else "evaluated on"
                hits[lineage.id] = _hit(lineage, f"{verb} {path}", role == TRAINED, withdrawn)
    for learned in [hit for hit in hits.values() if hit.learned]:
        for relation, child in registry.descendants(registry.get(learned.id)):
            if child.id not in hits or not hits[child.id].learned:
                hits[child.id] = _hit(child, f"{relation} {learned.name} ({learned.id[:12]})", True, withdrawn)
    return sorted(hits.values(), key=lambda hit: (hit.name, hit.id))


def _hit(lineage: Lineage, relation: str, learned: bool, withdrawn: dict) -> AdapterHit:
    directory = Path(lineage.directory)
    on_disk = directory.is_dir() and weights_id(weight_hashes(directory)) == lineage.id
    return AdapterHit(
        lineage.name, lineage.id, lineage.kind, directory, relation, learned, on_disk, lineage.id in withdrawn
    )


def request_log_exists(database: Path) -> bool:
    if not database.exists():
        return False
    db = sqlite3.connect(database, timeout=30)
    try:
        return bool(db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone())
    finally:
        db.close()


def _scan_requests(database: Path, matcher: PersonMatcher) -> Iterator[RequestHit]:
    if not request_log_exists(database):
        return
    db = sqlite3.connect(database, timeout=30)
    try:
        rows = db.execute("SELECT id, request_id, time, content, error, model FROM requests ORDER BY id")
        for row_id, request_id, moment, content, error, model in rows:
            fields = [
                name
                for name, value in (("content", _json_or_text(content)), ("error", error), ("model", model))
                if value is not None and _holds(value, matcher)
            ]
            if fields:
                yield RequestHit(row_id, request_id, moment, fields)
    finally:
        db.close()


def _json_or_text(value: str | None) -> object:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _holds(value: object, matcher: PersonMatcher) -> bool:
    return any(matcher.matches(text) for text in strings_in(value))


def _audit_entries(fleet_dir: Path) -> Iterator[dict]:
    directory = audit_dir(fleet_dir)
    if not directory.is_dir() or not list_segments(directory):
        return
    for line in read_lines(directory):
        try:
            yield json.loads(line.text)
        except json.JSONDecodeError:
            continue  # a damaged line is `lorafleet audit verify`'s to report; it holds nothing we can read


def _checkpoints_holding(fleet_dir: Path, entries: list[dict], adapters: set[str]) -> list[CheckpointHit]:
    """Checkpoint files on disk that an audit entry says hold the training state of `adapters`."""
    if not adapters:
        return []
    holding: dict[str, list[str]] = {}
    for entry in entries:
        if entry["event"] == "train.checkpoint":
            names = sorted(adapters & set(entry["data"].get("active") or []))
            if names:
                holding.setdefault(entry["data"]["sha256"], []).extend(names)
    found = []
    for path in FleetDir(fleet_dir).checkpoint_files():
        names = holding.get(sha256_file(path))
        if names:
            found.append(CheckpointHit(path, sorted(set(names))))
    return found
