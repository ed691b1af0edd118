"""Retention: how long the fleet keeps its audit log, and the one way entries may be deleted.

The period is the fleet config's `audit_keep_days`, stored beside the log (`audit/retention.json`)
so that training, the server and `lorafleet audit prune` apply the same one, and recorded in the
chain (`audit.retention`) whenever it changes, with who changed it. A prune deletes whole monthly
segments whose month ended more than the period ago and records itself as an `audit.pruned` entry
(the retention in force, the days it kept, the months it deleted, the first entry it kept, who and
when), written under the same lock as the deletion. `verify_chain` (governance/audit.py) accepts a
log that starts late only after such an entry, and only if these rules allowed it; with a public
key, only if a signed checkpoint covers it (governance/signing.py).

The EU AI Act asks providers (Art. 19(1)) and deployers (Art. 26(6)) of high-risk AI systems to
keep the logs the system generates, as far as they control them, for at least six months unless
other law says otherwise: a shorter period is allowed here, with a warning, because not every
fleet is a high-risk system.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lorafleet.errors import AuditError
from lorafleet.governance.audit import (
    MIN_KEEP_DAYS,
    PRUNED,
    RETENTION,
    AuditLog,
    VerifyReport,
    audit_dir,
    list_segments,
    month_end,
    parse_time,
    read_lines,
)

RETENTION_FILE = "retention.json"
SIX_MONTHS_DAYS = 184  # the longest six calendar months (July to December)


def who(via: str) -> dict:
    """Who is acting, as the log records it: the account, the host, the process and the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container)
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(), "via": via}


def check_keep_days(keep_days: int, where: str) -> str | None:
    """Refuse a period below one day (AuditError); a warning, to show the user, below six months."""
    if keep_days < MIN_KEEP_DAYS:
        raise AuditError(
            f"{where}: {keep_days} days keeps less than a day, so every month but the current one would be "
            f"deleted; keep at least {MIN_KEEP_DAYS} day (high-risk AI systems: six months, {SIX_MONTHS_DAYS} days)"
        )
    if keep_days < SIX_MONTHS_DAYS:
        return (
            f"{where}: {keep_days} days is less than six months; providers and deployers of high-risk AI "
            f"systems keep logs at least six months (EU AI Act Art. 19(1), 26(6)): {SIX_MONTHS_DAYS} days or more"
        )
    return None


def prune(fleet_dir: str | Path, keep_days: int, via: str) -> list[Path]:
    """Delete every monthly segment but the newest whose month ended more than `keep_days` ago,
    and record it in the same locked step. The first kept entry's `prev` still names the last
    deleted one, which the entry records, so the chain stays verifiable. Returns what was deleted."""
    check_keep_days(keep_days, "--keep-days")
    in_force = retention_days(fleet_dir)
    if in_force is not None and keep_days < in_force:
        raise AuditError(
            f"{fleet_dir}: keeping {keep_days} days is less than the fleet's retention of {in_force} days; "
            "change audit_keep_days in the fleet config to shorten it (the change is logged)"
        )
    log = AuditLog(fleet_dir)
    with log.exclusive():
        cutoff = parse_time(log.clock()) - timedelta(days=keep_days)
        segments = list_segments(log.directory)
        doomed = []
        for segment in segments[:-1]:  # the newest month stays: the chain continues from it
            if month_end(segment.stem) > cutoff:
                break
            doomed.append(segment)
        if not doomed:
            return []
        first_kept = json.loads(next(iter(read_lines(segments[len(doomed)]))).text)
        for segment in doomed:
            segment.unlink()
        record = {
            "deleted_segments": [segment.name for segment in doomed],
            "keep_days": keep_days,
            "retention_days": in_force,
            "kept_from_seq": first_kept["seq"],
            "kept_from_prev": first_kept["prev"],
            "by": who(via),
        }
        log.append_held([(PRUNED, record)])
    return doomed


def set_retention(fleet_dir: str | Path, keep_days: int, via: str) -> None:
    """Store the fleet's retention period; a change is also an `audit.retention` entry."""
    previous = retention_days(fleet_dir)
    log = AuditLog(fleet_dir)
    partial = log.directory / (RETENTION_FILE + ".partial")
    partial.write_text(json.dumps({"keep_days": keep_days}) + "\n")
    os.replace(partial, log.directory / RETENTION_FILE)
    if keep_days != previous:
        log.append(RETENTION, {"keep_days": keep_days, "previous": previous, "by": who(via)})


def retention_days(fleet_dir: str | Path) -> int | None:
    path = audit_dir(fleet_dir) / RETENTION_FILE
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["keep_days"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise AuditError(f'{path}: expected {{"keep_days": DAYS}}; set audit_keep_days in the fleet config') from err


def apply_retention(fleet_dir: str | Path, via: str) -> list[Path]:
    """Prune by the fleet's stored retention period; nothing without one (keep everything)."""
    keep_days = retention_days(fleet_dir)
    return prune(fleet_dir, keep_days, via) if keep_days is not None else []


def retention_cutoff(keep_days: int, now: datetime | None = None) -> datetime:
    """What a period of `keep_days` allows deleting: everything before this moment."""
    return (now or datetime.now(UTC)) - timedelta(days=keep_days)


def describe_retention(report: VerifyReport) -> list[str]:
    """What a verified log records of retention: the period in force, its changes and the prunes,
    each with who and when. A shortened period is no tampering, but an auditor should see it."""
    lines = []
    if report.retention_changes:
        last = report.retention_changes[-1]
        lines.append(
            f"retention: {last['data']['keep_days']} days, set {last['time']} by {_by(last)}; "
            f"{len(report.retention_changes)} change(s) in the log"
        )
    if report.prunes:
        last, data = report.prunes[-1], report.prunes[-1]["data"]
        lines.append(
            f"{len(report.prunes)} prune(s); the last {last['time']} by {_by(last)}: deleted "
            f"{', '.join(data['deleted_segments'])}, kept {data['keep_days']} days"
        )
    return lines


def _by(entry: dict) -> str:
    by = entry["data"].get("by") or {}
    return f"{by.get('user')}@{by.get('host')} ({by.get('via')})"
