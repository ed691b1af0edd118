"""The Fleet page's facts: the base, every adapter on disk or in the registry (its registry row:
data hashes, config, held-out scores against the base, size, withdrawn or not, served or not) and
each one's drafted documents (model card, Annex IV), made from the registry as `lorafleet docs`
makes them but returned, not written into the fleet.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet.errors import ConfigError, RegistryError
from lorafleet.fleet_dir import FleetDir, find_base_dir, fleet_adapters
from lorafleet.governance.documents import annex_iv, model_card
from lorafleet.governance.lineage import DataFile, Lineage
from lorafleet.governance.log_facts import read_log_facts
from lorafleet.governance.registry import Registry, children_in, withdrawn_weights

CONFIG_SHOWN = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_dora")


def registry_records(fleet_dir: Path) -> list[Lineage]:
    """Every record of the fleet's registry (none when it has no registry)."""
    if not FleetDir(fleet_dir).database.exists():
        return []
    registry = Registry(fleet_dir)
    try:
        return registry.all()
    finally:
        registry.close()


def fleet_summary(fleet_dir: Path, served: list[str] | None) -> dict:
    """The base and each adapter or model of the fleet; `served`: the adapters being served now
    (None when nothing is served, as under `lorafleet console`)."""
    records = registry_records(fleet_dir)
    newest = {lineage.name: lineage for lineage in records}  # the registry lists oldest first
    withdrawn = withdrawn_weights(fleet_dir)
    on_disk = _adapters_on_disk(fleet_dir)
    names = list(dict.fromkeys([*on_disk, *(r.name for r in records if r.kind == "adapter")]))
    adapters = [_adapter(name, newest.get(name), on_disk.get(name), withdrawn, served) for name in names]
    models = [_model(lineage) for lineage in records if lineage.kind != "adapter"]
    return {"fleet": str(fleet_dir), "base": _base(fleet_dir), "adapters": adapters, "models": models}


def _adapters_on_disk(fleet_dir: Path) -> dict[str, Path]:
    try:
        return fleet_adapters(fleet_dir)
    except ConfigError:
        return {}  # a badly named directory: `lorafleet serve` says so; the console shows the rest


def _base(fleet_dir: Path) -> dict:
    try:
        base = find_base_dir(fleet_dir)
    except ConfigError as err:
        return {"name": None, "problem": str(err)}
    return {"name": base.name, "path": str(base), "bytes": _weight_bytes(base)}


def _adapter(
    name: str, lineage: Lineage | None, directory: Path | None, withdrawn: dict, served: list[str] | None
) -> dict:
    config = _adapter_config(directory)
    row = {
        "name": name,
        "id": lineage.id if lineage else None,
        "on_disk": directory is not None,
        "path": f"adapters/{name}" if directory is not None else None,
        "bytes": _weight_bytes(directory) if directory is not None else None,
        "config": {key: config[key] for key in CONFIG_SHOWN if key in config},
        "served": None if served is None else name in served,
        "withdrawn": withdrawn.get(lineage.id) if lineage else None,
    }
    if lineage is not None:
        row |= {
            "finished": lineage.finished,
            "final_loss": lineage.loss.get("final"),
            "steps": lineage.loss.get("steps"),
            "data": [_data(data) for data in lineage.data],
            "scores": scores_against_base(lineage),
            "parents": [_parent(parent) for parent in lineage.parents],
        }
    return row


def _data(data: DataFile) -> dict:
    return {"path": data.path, "sha256": data.sha256, "records": data.records, "tokens": data.tokens}


def _model(lineage: Lineage) -> dict:
    return {
        "name": lineage.name,
        "id": lineage.id,
        "kind": lineage.kind,
        "bytes": _weight_bytes(Path(lineage.directory)) if Path(lineage.directory).is_dir() else None,
        "finished": lineage.finished,
        "scores": scores_against_base(lineage),
        "parents": [_parent(parent) for parent in lineage.parents],
    }


def _parent(parent: dict) -> dict:
    return {"relation": parent["relation"], "name": parent.get("name") or Path(parent["path"]).name}


def scores_against_base(lineage: Lineage) -> list[dict]:
    """One row per held-out file: its name and hash, and the numbers `lorafleet eval` (or the demo)
    recorded, the base's accuracy on the same file beside the adapter's when it was measured."""
    rows = []
    for data_sha256, scores in lineage.evaluation.items():
        numbers = {key: value for key, value in scores.items() if isinstance(value, int | float)}
        rows.append(
            {
                "data": Path(str(scores.get("data", data_sha256))).name,
                "data_sha256": data_sha256,
                "evaluated": scores.get("evaluated"),
                "accuracy": numbers.get("accuracy"),
                "base_accuracy": numbers.get("base_accuracy"),
                "numbers": numbers,
            }
        )
    return rows


def _adapter_config(directory: Path | None) -> dict:
    path = directory / "adapter_config.json" if directory is not None else None
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _weight_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors")) + sum(
        path.stat().st_size for path in directory.glob("*.bin")
    )


def document(fleet_dir: Path, name: str, kind: str) -> str:
    """The model card ("card") or the Annex IV draft ("annex") of `name`, drafted from the registry
    and the audit log now (RegistryError when the registry has no such record)."""
    if not FleetDir(fleet_dir).database.exists():
        raise RegistryError(f"{fleet_dir} has no registry: documents are drafted from it (lorafleet train writes it)")
    registry = Registry(fleet_dir)
    try:
        lineage = registry.find(name)
        if kind == "card":
            return model_card(lineage)
        return annex_iv(lineage, children_in([registry], lineage), read_log_facts(fleet_dir, lineage))
    finally:
        registry.close()
