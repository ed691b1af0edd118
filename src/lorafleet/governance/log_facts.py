"""What a fleet's audit log says that an adapter's documents must state: whether the log verifies,
the entries about the adapter, how the fleet was served (with or without keys), the data checks
of its exact training files (matched by SHA-256, never by name) and the signed checkpoints.

The documents (governance/documents.py) claim only what these facts show: a fleet served without
keys is described as such, and a log that does not verify is said not to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import AuditError
from lorafleet.governance.audit import CHECKPOINT, audit_dir, list_segments, read_lines, verify_chain
from lorafleet.governance.lineage import Lineage


@dataclass
class LogFacts:
    found: bool  # the fleet has an audit log
    verified: str = ""  # "N entries, seq a..b" when the chain verifies
    problem: str | None = None  # why it does not
    about: list[dict] = field(default_factory=list)  # entries about the adapter (not requests)
    serve_starts: list[dict] = field(default_factory=list)  # serve.start entries that served it
    data_events: dict[str, list[dict]] = field(default_factory=dict)  # training data SHA-256 -> data.* entries
    checkpoints: list[dict] = field(default_factory=list)  # audit.checkpoint entries


def read_log_facts(fleet_dir: Path, lineage: Lineage) -> LogFacts:
    directory = audit_dir(fleet_dir)
    if not list_segments(directory):
        return LogFacts(found=False)
    facts = LogFacts(found=True)
    try:
        report = verify_chain(directory)
        facts.verified = f"{report.entries} entries, seq {report.first_seq}..{report.last_seq}"
    except AuditError as err:
        facts.problem = str(err)
    hashes = {data.sha256 for data in lineage.data}
    for line in read_lines(directory):
        try:
            entry = json.loads(line.text)
            _collect(entry, lineage, hashes, facts)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # a broken line is what `problem` reports; the documents use the rest
    return facts


def _collect(entry: dict, lineage: Lineage, hashes: set[str], facts: LogFacts) -> None:
    event, data = entry["event"], entry["data"]
    if event == "serve.start" and _served(data, lineage):
        facts.serve_starts.append(entry)
    elif event == CHECKPOINT:
        facts.checkpoints.append(entry)
    elif event.startswith("data."):
        text = json.dumps(data)
        for digest in hashes:
            if digest in text:
                facts.data_events.setdefault(digest, []).append(entry)
    if event != "serve.request" and _names(entry, lineage):
        facts.about.append(entry)


def _served(data: dict, lineage: Lineage) -> bool:
    adapters = data.get("adapters") or {}
    return lineage.id in adapters.values() or lineage.name in adapters


def _names(entry: dict, lineage: Lineage) -> bool:
    """Whether an audit entry is about this adapter (training events name it; others carry its id)."""
    data = entry["data"]
    if lineage.id in json.dumps(data):
        return True
    if entry["event"].startswith("train."):
        return data.get("adapter") == lineage.name or lineage.name in data.get("adapters", [])
    return False


# --- sentences for the documents ----------------------------------------------------------------


def verification_line(facts: LogFacts) -> str:
    if not facts.found:
        return "no audit log found in the fleet directory"
    if facts.problem:
        return f"AUDIT LOG DOES NOT VERIFY: {facts.problem}"
    return f"audit log verified: {facts.verified}"


def security_measures(facts: LogFacts) -> str:
    """Annex IV 2(h), from what the log shows rather than what lorafleet can do."""
    if not facts.found:
        return "The fleet directory holds no audit log: nothing about this system's operation was recorded."
    parts = [_log_integrity(facts), _serving(facts.serve_starts)]
    return " ".join(parts)


def _log_integrity(facts: LogFacts) -> str:
    if facts.problem:
        chain = f"The fleet's hash-chained audit log DOES NOT VERIFY ({facts.problem})."
    else:
        chain = f"The fleet's audit log is hash-chained and verifies ({facts.verified})."
    if not facts.checkpoints:
        return (
            f"{chain} It carries no signed checkpoints, so whoever can write its directory could rewrite it "
            "undetected (`lorafleet audit sign`, or `lorafleet serve --audit-key`)."
        )
    newest = facts.checkpoints[-1]
    return (
        f"{chain} It carries {len(facts.checkpoints)} Ed25519-signed checkpoints (the newest signs entry seq "
        f"{newest['data'].get('seq')}, {newest['time']}); they prove it against rewriting only with the public "
        "key and a copy of the checkpoints kept off the fleet's host."
    )


def _serving(starts: list[dict]) -> str:
    if not starts:
        return "The audit log records no serving of this adapter."
    keyed = [entry for entry in starts if entry["data"].get("keys")]
    open_starts = len(starts) - len(keyed)
    sentences = [f"The audit log records {len(starts)} server start(s) serving this adapter:"]
    if keyed:
        tenants = sorted({name for entry in keyed for name in (entry["data"]["keys"].get("tenants") or {})})
        sentences.append(
            f"{len(keyed)} with per-tenant API keys (stored as SHA-256 hashes; tenants: "
            f"{', '.join(tenants) or 'none'}), each tenant limited to its adapters and rates."
        )
    if open_starts:
        sentences.append(
            f"{open_starts} without API keys: on the loopback interface only, where every local user could use "
            "every adapter with no per-tenant access control or rate limit."
        )
    if any(entry["data"].get("log_content") for entry in starts):
        sentences.append("Prompts and replies were logged (personal data replaced by placeholders).")
    return " ".join(sentences)


def data_checks(lineage: Lineage, facts: LogFacts) -> list[str]:
    """Annex IV 2(d): what the log records about each exact training file (same SHA-256)."""
    lines = []
    for data in lineage.data:
        events = facts.data_events.get(data.sha256, [])
        if not events:
            lines.append(f"- `{data.path}`: no `lorafleet data check` of this file (sha256 `{data.sha256}`) is logged.")
        for entry in events:
            lines.append(f"- `{data.path}`: {_data_event(entry, data.sha256)}")
    return lines


def _data_event(entry: dict, digest: str) -> str:
    where = f"{entry['time']} (audit seq {entry['seq']})"
    if entry["event"] != "data.check":
        return f"`{entry['event']}` at {where} names this file's SHA-256."
    checked = next((f for f in entry["data"].get("files", []) if f.get("sha256") == digest), None)
    if checked is None:
        return f"`data.check` at {where} names this file's SHA-256."
    duplicates = checked.get("duplicates") or {}
    pii = checked.get("pii") or {}
    found = ", ".join(f"{kind} {count}" for kind, count in sorted(pii.items()) if count) or "none"
    return (
        f"checked by `lorafleet data check` at {where}: {checked.get('records')} records, {checked.get('errors')} "
        f"malformed, {duplicates.get('exact')} exact and {duplicates.get('near')} near duplicates, "
        f"personal data found: {found}."
    )
