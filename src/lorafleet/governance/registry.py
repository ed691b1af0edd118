"""The fleet's lineage registry: every adapter and model lorafleet made, in the fleet's SQLite file.

One row per set of weights (its id is the SHA-256 over its weight files, so retraining under the
same name adds a row rather than overwriting one), holding the whole lineage record as JSON, and
one row per parent -> child link (init_from, compression). `lineage.json` beside each adapter holds
the same record, so the registry can be rebuilt from the directories and the files travel with
the adapter. Paths inside the fleet are stored relative to it and read back resolved against the
fleet's directory as given, so a copied or moved fleet's registry points into the copy.

Weights can be withdrawn (one row each in `withdrawn`, with why and, once retrained, by what they
were replaced): an adapter trained on records of a person who asked to be forgotten is, and
`lorafleet serve` refuses to load withdrawn weights unless forced.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from lorafleet.errors import RegistryError
from lorafleet.fleet_dir import DATABASE, FleetDir
from lorafleet.governance.lineage import Lineage, resolved_in, within_fleet

SCHEMA = """
CREATE TABLE IF NOT EXISTS lineage (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    directory TEXT NOT NULL,
    finished TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lineage_links (
    parent TEXT NOT NULL,  -- the parent's id when it is registered, else its path
    child TEXT NOT NULL,
    relation TEXT NOT NULL,
    PRIMARY KEY (parent, child, relation)
);
CREATE TABLE IF NOT EXISTS withdrawn (
    id TEXT PRIMARY KEY,  -- the weights' lineage id
    name TEXT NOT NULL,
    time TEXT NOT NULL,
    reason TEXT NOT NULL,
    replaced_by TEXT  -- the id of the weights retrained in their place
);
"""


class Registry:
    @staticmethod
    def open(fleet_dir: str | Path) -> Registry:
        """The registry of a fleet directory that has one (reading never creates one)."""
        if not FleetDir(fleet_dir).database.exists():
            raise RegistryError(
                f"{fleet_dir} has no registry ({DATABASE}); pass the fleet directory that `lorafleet train` "
                "or `lorafleet compress` wrote to"
            )
        return Registry(fleet_dir)

    def __init__(self, fleet_dir: str | Path) -> None:
        self.fleet_dir = Path(fleet_dir)
        self.path = FleetDir(fleet_dir).database
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.executescript(SCHEMA)

    def add(self, lineage: Lineage) -> None:
        lineage = within_fleet(lineage, self.fleet_dir)
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO lineage (id, name, kind, directory, finished, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    lineage.id,
                    lineage.name,
                    lineage.kind,
                    lineage.directory,
                    lineage.finished,
                    json.dumps(lineage.to_dict()),
                ),
            )
            for parent in lineage.parents:
                self._db.execute(
                    "INSERT OR IGNORE INTO lineage_links (parent, child, relation) VALUES (?, ?, ?)",
                    (parent.get("id") or parent["path"], lineage.id, parent["relation"]),
                )

    def all(self) -> list[Lineage]:
        rows = self._db.execute("SELECT record FROM lineage ORDER BY finished, name").fetchall()
        return [self._read(record) for (record,) in rows]

    def find(self, name_or_id: str) -> Lineage:
        """The newest record named `name_or_id`, or the one whose id starts with it."""
        row = self._db.execute(
            "SELECT record FROM lineage WHERE name = ? ORDER BY finished DESC LIMIT 1", (name_or_id,)
        ).fetchone()
        if row is None and len(name_or_id) >= 8:
            rows = self._db.execute("SELECT record FROM lineage WHERE id LIKE ?", (name_or_id + "%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            known = sorted({lineage.name for lineage in self.all()})
            raise RegistryError(
                f"{self.path}: no adapter or model named {name_or_id!r} (nor an id starting with it); "
                f"registered: {', '.join(known) or 'none'}"
            )
        return self._read(row[0])

    def get(self, lineage_id: str) -> Lineage | None:
        row = self._db.execute("SELECT record FROM lineage WHERE id = ?", (lineage_id,)).fetchone()
        return self._read(row[0]) if row else None

    def _read(self, record: str) -> Lineage:
        return resolved_in(Lineage.from_dict(json.loads(record)), self.fleet_dir)

    def children(self, lineage: Lineage) -> list[tuple[str, str]]:
        """(child id, relation) of everything made from `lineage`."""
        rows = self._db.execute(
            "SELECT child, relation FROM lineage_links WHERE parent IN (?, ?) ORDER BY child",
            (lineage.id, lineage.directory),
        )
        return rows.fetchall()

    def descendants(self, lineage: Lineage) -> list[tuple[str, Lineage]]:
        """(relation, record) of everything made from `lineage`, from its children down."""
        found: dict[str, tuple[str, Lineage]] = {}
        stack = [lineage]
        while stack:
            for child_id, relation in self.children(stack.pop()):
                child = self.get(child_id)
                if child is not None and child.id not in found:
                    found[child.id] = (relation, child)
                    stack.append(child)
        return list(found.values())

    def withdraw(self, lineage: Lineage, reason: str, time: str) -> None:
        """Mark weights as not to be served (a second withdrawal keeps the first reason)."""
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO withdrawn (id, name, time, reason) VALUES (?, ?, ?, ?)",
                (lineage.id, lineage.name, time, reason),
            )

    def replace(self, old_id: str, new_id: str) -> None:
        with self._db:
            self._db.execute("UPDATE withdrawn SET replaced_by = ? WHERE id = ?", (new_id, old_id))

    def withdrawn(self) -> dict[str, dict]:
        return withdrawn_weights(self.fleet_dir)

    def close(self) -> None:
        self._db.close()


def register(fleet_dir: str | Path, lineage: Lineage) -> None:
    """Record `lineage` in the registry of `fleet_dir` (made if it has none)."""
    registry = Registry(fleet_dir)
    try:
        registry.add(lineage)
    finally:
        registry.close()


def withdrawn_weights(fleet_dir: str | Path) -> dict[str, dict]:
    """The withdrawn weights of a fleet by lineage id (none when it has no registry); never
    creates a registry, so serving a plain model directory leaves it as it was."""
    path = FleetDir(fleet_dir).database
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=30)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'withdrawn'").fetchone():
            return {}
        rows = db.execute("SELECT id, name, time, reason, replaced_by FROM withdrawn").fetchall()
    finally:
        db.close()
    return {row[0]: dict(zip(("id", "name", "time", "reason", "replaced_by"), row, strict=True)) for row in rows}


def diff(a: Lineage, b: Lineage) -> list[tuple[str, object, object]]:
    """(field, value in a, value in b) for every leaf that differs, fields as dotted paths."""
    left, right = flatten(a.to_dict()), flatten(b.to_dict())
    missing = object()
    changed = []
    for key in sorted(left.keys() | right.keys()):
        x, y = left.get(key, missing), right.get(key, missing)
        if x != y:
            changed.append((key, None if x is missing else x, None if y is missing else y))
    return changed


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def find_in(registries: list[Registry], name_or_id: str) -> tuple[Lineage, Registry]:
    """The record from the first registry that knows `name_or_id`; the error lists every registry's names."""
    for registry in registries:
        try:
            return registry.find(name_or_id), registry
        except RegistryError:
            continue
    known = sorted({lineage.name for registry in registries for lineage in registry.all()})
    where = ", ".join(str(registry.path) for registry in registries)
    raise RegistryError(
        f"no adapter or model named {name_or_id!r} (nor an id starting with it) in {where}; "
        f"registered: {', '.join(known) or 'none'}"
    )


def children_in(registries: list[Registry], lineage: Lineage) -> list[tuple[str, str, str]]:
    """(relation, child name, child id) of everything made from `lineage`, in any of the registries."""
    found = set()
    for registry in registries:
        for child_id, relation in registry.children(lineage):
            child = registry.get(child_id)
            found.add((relation, child.name if child else "?", child_id))
    return sorted(found)


# --- how the CLI shows records ---------------------------------------------------------------


def format_table(records: list[Lineage]) -> str:
    header = f"{'name':<20} {'kind':<8} {'id':<12} {'finished':<20} {'final loss':>10}  parents"
    lines = [header]
    for lineage in records:
        final = lineage.loss.get("final")
        parents = ", ".join(f"{p['relation']} {p.get('name') or p['path']}" for p in lineage.parents) or "-"
        lines.append(
            f"{lineage.name:<20} {lineage.kind:<8} {lineage.id[:12]:<12} {(lineage.finished or '-')[:19]:<20} "
            f"{f'{final:.4f}' if final is not None else '-':>10}  {parents}"
        )
    return "\n".join(lines)


def format_record(lineage: Lineage, children: list[tuple[str, str, str]]) -> str:
    """One record, readably: what it is, what made it, and what was made from it."""
    lines = [
        f"{lineage.name} ({lineage.kind}) id {lineage.id}",
        f"  directory: {lineage.directory}",
        "  weights:   " + ", ".join(f"{name} {digest[:16]}" for name, digest in lineage.weights_sha256.items()),
        f"  base:      {lineage.base.get('path')} "
        + " ".join(f"{name} {digest[:16]}" for name, digest in lineage.base.get("weights_sha256", {}).items()),
    ]
    for data in lineage.data:
        lines.append(
            f"  data:      {data.path} sha256 {data.sha256[:16]}: {data.records} records, {data.tokens} tokens, "
            f"{data.images} images, {data.skipped} skipped"
        )
    if lineage.started or lineage.finished:
        lines.append(f"  trained:   {lineage.started} .. {lineage.finished}")
    if lineage.loss:
        per_epoch = ", ".join(f"{loss:.4f}" for loss in lineage.loss.get("per_epoch", []))
        lines.append(f"  loss:      final {lineage.loss.get('final')}, per epoch [{per_epoch}]")
    if lineage.compute:
        lines.append("  compute:   " + ", ".join(f"{key} {value}" for key, value in lineage.compute.items()))
    if lineage.seeds:
        lines.append("  seeds:     " + ", ".join(f"{key} {value}" for key, value in lineage.seeds.items()))
    software = lineage.software
    if software:
        lines.append("  software:  " + ", ".join(f"{key} {value}" for key, value in software.items()))
    for data_key, scores in lineage.evaluation.items():
        shown = ", ".join(
            f"{key} {value}"
            for key, value in scores.items()
            if key not in ("data", "data_sha256", "evaluated") and not isinstance(value, dict)
        )
        where = f"{scores.get('data', data_key)} sha256 {scores.get('data_sha256', data_key)[:16]}"
        lines.append(f"  eval:      {where} ({scores.get('evaluated')}): {shown}")
    for parent in lineage.parents:
        lines.append(f"  parent:    {parent['relation']} <- {parent.get('name') or '?'} ({parent['path']})")
    for relation, name, child_id in children:
        lines.append(f"  child:     {relation} -> {name} ({child_id[:12]})")
    return "\n".join(lines)
