"""The fleet directory's layout, written down once.

A fleet directory is what `lorafleet train` writes (the fleet YAML's `output:`) and `lorafleet
demo` makes; serving, evaluation, compression, the report and governance read it:

    base/                          the base model, when the fleet holds its own copy (the demo's)
    adapters/<name>/               one PEFT adapter directory per adapter
    checkpoints/step-NNNNNNNN.pt   the trainer's checkpoints, by fleet step
    metrics.jsonl                  one line per optimizer step of each adapter
    tensorboard/<name>/            the same numbers as TensorBoard events (report_to: [tensorboard])
    report.html                    the run as one page (`lorafleet report`)
    sweep.json                     a sweep's space, trials, rung decisions and winner (`lorafleet sweep`)
    eval*.json                     `lorafleet eval --json` results the report tables
    lorafleet.sqlite               the lineage registry and the request log
    audit/                         the hash-chained audit log
    replicas/<id>/audit/           each gateway replica's own audit chain (lorafleet serve --state)
    erasures/<id>/                 what `lorafleet data forget` did: its plan, the retraining fleet
                                   file and the retraining run (a fleet directory of its own)
    trials/                        a sweep's trials (`lorafleet sweep`): a fleet directory of its
                                   own, so that adapters/ holds the winner alone

Paths inside a fleet resolve relative to it, so a fleet can be copied or moved. What lies inside
`audit/` and inside each adapter's directory belongs to governance and to the PEFT format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorafleet.config import adapter_name_problem
from lorafleet.errors import ConfigError

BASE = "base"
ADAPTERS = "adapters"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
REPORT = "report.html"
SWEEP = "sweep.json"
DATABASE = "lorafleet.sqlite"  # shared by the registry and the request log: the fleet's one database
AUDIT = "audit"
ERASURES = "erasures"
REPLICAS = "replicas"
TRIALS = "trials"
_REPLICA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")


class FleetDir:
    """Where each thing a fleet holds lies under `root` (nothing is checked or created)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def base(self) -> Path:
        return self.root / BASE

    @property
    def adapters(self) -> Path:
        return self.root / ADAPTERS

    def adapter(self, name: str) -> Path:
        return self.adapters / name

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, fleet_step: int) -> Path:
        return self.checkpoints / f"step-{fleet_step:08d}.pt"

    def checkpoint_files(self) -> list[Path]:
        """The trainer's checkpoints on disk, oldest first."""
        if not self.checkpoints.exists():
            return []
        return sorted(path for path in self.checkpoints.iterdir() if _CHECKPOINT.match(path.name))

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def sweep(self) -> Path:
        return self.root / SWEEP

    def eval_results(self) -> list[Path]:
        return sorted(self.root.glob("eval*.json"))

    @property
    def database(self) -> Path:
        return self.root / DATABASE

    @property
    def audit(self) -> Path:
        return self.root / AUDIT

    def replica(self, replica_id: str) -> Path:
        """A gateway replica's own directory, holding its audit chain in `audit/` (ConfigError for
        an id that is not a plain name)."""
        if not _REPLICA_ID.match(replica_id):
            raise ConfigError(
                f"replica id {replica_id!r}: use letters, digits, '.', '_' and '-' (at most 64, starting with a "
                "letter or digit); it names the replica's directory and every entry of its audit chain"
            )
        return self.root / REPLICAS / replica_id

    def replica_audits(self) -> list[Path]:
        """Every replica's audit chain under this fleet, by replica id."""
        return sorted(path for path in (self.root / REPLICAS).glob(f"*/{AUDIT}") if path.is_dir())

    @property
    def erasures(self) -> Path:
        return self.root / ERASURES

    def erasure(self, erasure_id: str) -> Path:
        return self.erasures / erasure_id

    @property
    def trials(self) -> Path:
        return self.root / TRIALS


def checkpoint_step(path: Path) -> int | None:
    """The fleet step of a checkpoint file, or None when `path` is not named as one."""
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def find_base_dir(fleet_dir: Path) -> Path:
    """The base of a fleet: its own base/, the directory itself when it is a model directory, else
    the base path the adapters were trained on (`base_model_name_or_path`)."""
    fleet = FleetDir(fleet_dir)
    if (fleet.base / "config.json").exists():
        return fleet.base
    if (fleet.root / "config.json").exists():  # a model directory itself
        return fleet.root
    for config in sorted(fleet.adapters.glob("*/adapter_config.json")):
        recorded = json.loads(config.read_text()).get("base_model_name_or_path")
        if recorded and Path(recorded).exists():
            return Path(recorded)
    raise ConfigError(
        f"{fleet_dir}: no base/ directory and no adapter that names an existing base model; pass --base DIR"
    )


def fleet_adapters(fleet_dir: Path) -> dict[str, Path]:
    """The fleet's adapters by name; a directory whose name cannot name an adapter is an error at
    start-up, not a crash at the first request."""
    found = {c.parent.name: c.parent for c in sorted(FleetDir(fleet_dir).adapters.glob("*/adapter_config.json"))}
    for name, path in found.items():
        problem = adapter_name_problem(name)
        if problem:
            raise ConfigError(f"{path}: {problem}; rename the directory")
    return found
