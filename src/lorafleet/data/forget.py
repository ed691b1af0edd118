"""`lorafleet data forget`: act on what `data find` found, so the fleet no longer holds a person.

1. Every data file with the person's records is rewritten without those lines, in place and
   atomically (every other line byte for byte as it was); the lineage of what was trained on it
   keeps the file's old SHA-256, the new one goes in the erasure's plan.
2. The request log's rows that hold the person get each identifier replaced by `<KIND_ERASED>`,
   under SQLite's secure_delete, then the database is vacuumed and its write-ahead log truncated,
   so no free page or WAL frame keeps the old text.
3. Every version that learned from the records (and everything made from it) is withdrawn in the
   registry: `lorafleet serve` refuses it unless forced. Trainer checkpoints that hold such an
   adapter's state are deleted.
4. A retraining plan is written to `<fleet>/erasures/<id>/`: one fleet file per set of adapters
   that trained under the same fleet settings (normally one), each adapter with its recorded
   config and seed on the cleaned file, training into `run/` beside it. `adopt_retrained` (after
   the CLI has trained it: this floor cannot train) moves each new adapter into the fleet's
   `adapters/<name>/` in place of the withdrawn one, registers it as the child of the old version
   (relation `retrained_after_erasure`) and records the replacement.

Entries of the audit log are never rewritten (that is what makes the log worth keeping): the
server logs content redacted, and `data find` reports any entry that still holds an identifier so
that retention can be shortened for it. Compressed models and adapters initialised from a
withdrawn one are withdrawn and listed, not rebuilt: compress or train them again from the new
version.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorafleet.data.erasure import ErasureReport, request_log_exists
from lorafleet.data.person import PersonMatcher, redact_json
from lorafleet.errors import RegistryError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import AuditLog, audit_dir, read_head, utc_now
from lorafleet.governance.lineage import Lineage, read_lineage, sha256_file, write_lineage
from lorafleet.governance.registry import Registry

PLAN_FILE = "plan.json"
RETRAINED = "retrained_after_erasure"


@dataclass
class RetrainRun:
    fleet_file: Path
    output: Path
    adapters: dict[str, str]  # name -> id of the withdrawn version it replaces


@dataclass
class ForgetResult:
    erasure_id: str
    directory: Path
    files: list[dict] = field(default_factory=list)  # path, sha256 before and after, removed lines
    requests_redacted: list[str] = field(default_factory=list)  # request ids
    database_compacted: bool = True  # VACUUM and WAL truncation ran: no free page keeps old text
    withdrawn: list[dict] = field(default_factory=list)  # name, id, kind
    checkpoints_deleted: list[str] = field(default_factory=list)
    retrain: list[RetrainRun] = field(default_factory=list)
    not_retrained: list[dict] = field(default_factory=list)  # name, id, why
    audit_entries_kept: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["directory"] = str(self.directory)
        record["retrain"] = [
            {"fleet_file": str(run.fleet_file), "output": str(run.output), "adapters": run.adapters}
            for run in self.retrain
        ]
        return record

    def summary(self) -> str:
        removed = sum(len(item["removed_lines"]) for item in self.files)
        names = ", ".join(name for run in self.retrain for name in run.adapters) or "none"
        lines = [
            f"erasure {self.erasure_id}: {removed} records removed from {len(self.files)} files, "
            f"{len(self.requests_redacted)} logged requests redacted, {len(self.withdrawn)} adapters and models "
            f"withdrawn, {len(self.checkpoints_deleted)} checkpoints deleted",
            f"to retrain: {names}" + "".join(f"\n  fleet file: {run.fleet_file}" for run in self.retrain),
        ]
        if not self.database_compacted:
            lines.append(
                "the request log was in use (lorafleet serve?): its rows are redacted, but old text may stay in free "
                "pages until `sqlite3 lorafleet.sqlite 'VACUUM; PRAGMA wal_checkpoint(TRUNCATE)'` runs with it stopped"
            )
        for item in self.not_retrained:
            lines.append(f"not retrained: {item['name']} ({item['id'][:12]}): {item['why']}")
        if self.audit_entries_kept:
            lines.append(
                f"audit entries that hold the person and cannot be rewritten: seq {self.audit_entries_kept} "
                "(they leave with the retention period)"
            )
        return "\n".join(lines)


def forget_person(fleet_dir: str | Path, report: ErasureReport, matcher: PersonMatcher, clock=utc_now) -> ForgetResult:
    """Remove what `report` found (data records, logged requests), withdraw what learned from it,
    delete checkpoints that hold it, and write the retraining plan. Recorded in the audit log."""
    fleet_dir = Path(fleet_dir)
    now = clock()
    erasure_id = f"{now[:26].replace('-', '').replace(':', '').replace('.', '')}Z-{report.person_sha256[:8]}"
    result = ForgetResult(erasure_id, FleetDir(fleet_dir).erasure(erasure_id))
    result.directory.mkdir(parents=True, exist_ok=False)
    result.files = [_remove_lines(hits.path, [record.line for record in hits.records]) for hits in report.files]
    result.requests_redacted = _redact_requests(FleetDir(fleet_dir).database, report, matcher)
    result.database_compacted = not result.requests_redacted or _compact(FleetDir(fleet_dir).database)
    registry = Registry.open(fleet_dir)
    try:
        _withdraw(registry, report, result, f"trained on records of a person erased by erasure {erasure_id}", now)
        _plan_retraining(registry, report, result)
    finally:
        registry.close()
    for hit in report.checkpoints:
        hit.path.unlink(missing_ok=True)
        result.checkpoints_deleted.append(str(hit.path))
    result.audit_entries_kept = [hit.seq for hit in report.audit_entries]
    _write_plan(result, report.person_sha256)
    AuditLog(fleet_dir).append("data.forget", {"found": report.audit_summary(), "done": result.to_json()})
    return result


# --- data files ----------------------------------------------------------------------------


def _remove_lines(path: Path, numbers: list[int]) -> dict:
    """Rewrite `path` without the lines `numbers` (1-based), atomically, keeping its mode."""
    before = sha256_file(path)
    lines = path.read_bytes().split(b"\n")
    dropped = set(numbers)
    kept = [line for number, line in enumerate(lines, start=1) if number not in dropped]
    partial = path.with_name(f".{path.name}.erasure-partial")
    try:
        with partial.open("wb") as handle:
            handle.write(b"\n".join(kept))
            handle.flush()
            os.fsync(handle.fileno())
        shutil.copymode(path, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(path), "sha256_before": before, "sha256_after": sha256_file(path), "removed_lines": numbers}


# --- the request log -------------------------------------------------------------------------


def _redact_requests(database: Path, report: ErasureReport, matcher: PersonMatcher) -> list[str]:
    if not report.requests or not request_log_exists(database):
        return []
    db = sqlite3.connect(database, timeout=30)
    try:
        # secure_delete: the space the old text took is overwritten with zeros, not left free.
        db.execute("PRAGMA secure_delete = ON")
        with db:
            for hit in report.requests:
                content, error, model = db.execute(
                    "SELECT content, error, model FROM requests WHERE id = ?", (hit.row,)
                ).fetchone()
                db.execute(
                    "UPDATE requests SET content = ?, error = ?, model = ? WHERE id = ?",
                    (
                        _redacted_content(content, matcher),
                        _redacted(error, matcher),
                        _redacted(model, matcher),
                        hit.row,
                    ),
                )
    finally:
        db.close()
    return [hit.request_id for hit in report.requests]


def _compact(database: Path) -> bool:
    """Rebuild the database and empty its write-ahead log, where old pages may still hold the
    text; False when another process (a running server) holds it."""
    db = sqlite3.connect(database, timeout=30)
    try:
        db.execute("PRAGMA secure_delete = ON")
        db.execute("VACUUM")
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


def _redacted(text: str | None, matcher: PersonMatcher) -> str | None:
    return matcher.redact(text) if text is not None else None


def _redacted_content(content: str | None, matcher: PersonMatcher) -> str | None:
    if content is None:
        return None
    try:
        return json.dumps(redact_json(json.loads(content), matcher))
    except json.JSONDecodeError:
        return matcher.redact(content)


# --- adapters --------------------------------------------------------------------------------


def _withdraw(registry: Registry, report: ErasureReport, result: ForgetResult, reason: str, now: str) -> None:
    for hit in report.adapters:
        if hit.learned:
            registry.withdraw(registry.get(hit.id), reason, now)
            result.withdrawn.append({"name": hit.name, "id": hit.id, "kind": hit.kind})


def _plan_retraining(registry: Registry, report: ErasureReport, result: ForgetResult) -> None:
    """One fleet file per group of adapters that trained under the same fleet settings."""
    groups: dict[str, list[Lineage]] = {}
    for hit in report.adapters:
        if not hit.learned:
            continue
        why = _why_not_retrained(hit)
        if why:
            result.not_retrained.append({"name": hit.name, "id": hit.id, "why": why})
            continue
        lineage = registry.get(hit.id)
        groups.setdefault(_fleet_settings_key(lineage), []).append(lineage)
    for index, lineages in enumerate(groups.values()):
        suffix = "" if index == 0 else f"-{index + 1}"
        run = RetrainRun(
            result.directory / f"retrain{suffix}.yaml",
            result.directory / f"run{suffix}",
            {lineage.name: lineage.id for lineage in lineages},
        )
        run.fleet_file.write_text(yaml.safe_dump(retraining_spec(lineages, run.output), sort_keys=False))
        result.retrain.append(run)


def _why_not_retrained(hit) -> str | None:
    if hit.kind != "adapter":
        return "a compressed model: run lorafleet compress again from the retrained adapter"
    if not hit.relation.startswith("trained on"):
        return "made from a withdrawn version: train it again from the retrained one"
    if not hit.on_disk:
        return "an older version, no longer in the fleet's adapters/: nothing to replace"
    return None


def _fleet_settings_key(lineage: Lineage) -> str:
    settings = {k: v for k, v in lineage.fleet_config.items() if k not in ("adapters", "output")}
    return json.dumps(settings | {"base": lineage.base.get("path")}, sort_keys=True)


def retraining_spec(lineages: list[Lineage], output: Path) -> dict:
    """A fleet file that trains `lineages` again as recorded (configs, seeds, fleet settings),
    each on its data file as it is now, into `output`."""
    first = lineages[0]
    settings = {k: v for k, v in first.fleet_config.items() if k not in ("adapters", "output", "base")}
    adapters = []
    for lineage in lineages:
        config = dict(lineage.adapter_config)
        config["data"] = str(Path(lineage.data[0].path).resolve())
        adapters.append(config)
    return {"base": str(first.base["path"]), "output": str(output), **settings, "adapters": adapters}


def _write_plan(result: ForgetResult, person_sha256: str) -> None:
    plan = result.to_json() | {"person_sha256": person_sha256, "retrained": not result.retrain}
    (result.directory / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")


def pending_plans(fleet_dir: str | Path, person_sha256: str) -> list[Path]:
    """The erasures of this person whose retraining has not been adopted yet, oldest first."""
    found = []
    for path in sorted(FleetDir(fleet_dir).erasures.glob(f"*/{PLAN_FILE}")):
        plan = json.loads(path.read_text())
        if plan["person_sha256"] == person_sha256 and not plan["retrained"]:
            found.append(path)
    return found


def retrain_runs(plan_path: Path) -> list[RetrainRun]:
    plan = json.loads(plan_path.read_text())
    return [RetrainRun(Path(run["fleet_file"]), Path(run["output"]), run["adapters"]) for run in plan["retrain"]]


def adopt_retrained(fleet_dir: str | Path, plan_path: Path, clock=utc_now) -> list[Lineage]:
    """Put each retrained adapter of the plan in place of the version it replaces: its directory,
    its lineage (a child of the old version) and the registry; records it in the audit log."""
    fleet_dir = Path(fleet_dir)
    adopted: list[Lineage] = []
    registry = Registry.open(fleet_dir)
    try:
        for run in retrain_runs(plan_path):
            for name, old_id in run.adapters.items():
                adopted.append(_adopt(registry, fleet_dir, FleetDir(run.output).adapter(name), name, old_id))
    finally:
        registry.close()
    plan = json.loads(plan_path.read_text())
    plan["retrained"] = True
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    runs = {str(run.output): read_head(audit_dir(run.output)) for run in retrain_runs(plan_path)}
    AuditLog(fleet_dir).append(
        "data.retrained",
        {
            "erasure": plan["erasure_id"],
            "adapters": [
                {"name": lineage.name, "id": lineage.id, "replaces": lineage.parents[-1]["id"]} for lineage in adopted
            ],
            "runs": runs,  # each retraining run's own audit log, by its newest entry
            "time": clock(),
        },
    )
    return adopted


def _adopt(registry: Registry, fleet_dir: Path, trained: Path, name: str, old_id: str) -> Lineage:
    old = registry.get(old_id)
    if old is None:
        raise RegistryError(f"{registry.path}: the withdrawn version {old_id[:12]} of {name} is not registered")
    target = FleetDir(fleet_dir).adapter(name)
    lineage = read_lineage(trained)
    retired = target.with_name(f".{name}.withdrawn")
    if target.exists():
        os.replace(target, retired)
    os.replace(trained, target)
    shutil.rmtree(retired, ignore_errors=True)  # the withdrawn weights learned from the erased records
    lineage.directory = str(target.resolve())
    lineage.parents.append({"relation": RETRAINED, "name": old.name, "path": old.directory, "id": old.id})
    write_lineage(lineage, target, fleet_dir)
    registry.add(lineage)
    registry.replace(old.id, lineage.id)
    return lineage
