"""`lorafleet sweep`: a sweep's trials trained as adapters of one fleet, halved at rungs, the best crowned.

Every trial is an adapter of one fleet run (train/trainer.py), so all trials share each forward and
backward over the frozen base. Held-out evaluation at the rungs is the trainer's batched no-grad
pass; successive halving (sweep/asha.py) decides on its numbers through the trainer's
`stops_early`, and a stopped trial is saved as it stands, keeps its metrics in metrics.jsonl, and
hands its slot to the next queued trial in the same fleet step.

The winner is the trial with the lowest final metric among those that trained their whole budget.
Its weights are copied to the department's adapter directory, and its lineage (under the
department's name, in the registry) records the sweep: the space, every trial with its values, its
metric curve and where it stopped, and why the winner won. `sweep.json` in the output holds the same.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import ConfigError, TrainingError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import AuditLog
from lorafleet.governance.lineage import read_lineage, write_lineage
from lorafleet.governance.registry import Registry
from lorafleet.models.loading import FrozenBase
from lorafleet.sweep.asha import SuccessiveHalving
from lorafleet.sweep.space import SweepSpec
from lorafleet.train import distributed
from lorafleet.train.job import AdapterJob
from lorafleet.train.trainer import FleetTrainer

SWEEP_FILE = "sweep.json"


@dataclass
class Trial:
    name: str
    values: dict  # the searched fields' values
    curve: list[tuple[int, float]]  # (optimizer step, metric) at each held-out evaluation
    steps: int  # optimizer steps trained
    stopped_at: int | None  # the rung it stopped at; None: it trained its whole budget

    @property
    def final(self) -> float | None:
        return self.curve[-1][1] if self.curve else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "final": self.final}


@dataclass
class SweepResult:
    winner: str  # the winning trial
    adapter: Path  # the department's adapter: the winner's weights
    trials: list[Trial]
    record: dict  # what sweep.json and the winner's lineage hold


def run_sweep(spec: SweepSpec, progress: bool = True, base: FrozenBase | None = None) -> SweepResult:
    """Train every trial of `spec` in one fleet with successive halving; save the winner as the
    department's adapter in `<output>/adapters/<department>/`."""
    if distributed.launched():  # every process would run the whole sweep and crown its own winner
        raise ConfigError("lorafleet sweep runs on one process; start it without torchrun")
    destination = FleetDir(spec.fleet.output).adapter(spec.department)
    if destination.exists():
        raise ConfigError(f"{destination} exists already; choose another output for the sweep or move it away")
    halving = SuccessiveHalving(spec.rungs)

    def stops_early(evaluated: list[tuple[AdapterJob, dict[str, float]]]) -> set[str]:
        return halving.stopping([(job.name, job.optimizer_step, numbers[spec.metric]) for job, numbers in evaluated])

    FleetTrainer(spec.fleet, base=base, progress=progress, stops_early=stops_early).run()
    trials = read_trials(spec, FleetDir(spec.fleet.output).metrics)
    winner = choose_winner(trials, spec)
    record = sweep_record(spec, trials, winner, halving)
    (Path(spec.fleet.output) / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    adapter = crown(spec, winner, record, destination)
    return SweepResult(winner.name, adapter, trials, record)


def read_trials(spec: SweepSpec, metrics: Path) -> list[Trial]:
    """Each trial's metric curve, steps and rung of stopping, from the run's metrics.jsonl."""
    trials = {name: Trial(name, values, [], 0, None) for name, values in spec.trials.items()}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        trial = trials.get(record.get("adapter"))
        if trial is None:
            continue
        trial.steps = record["step"]
        if spec.metric in record:
            trial.curve.append((record["step"], record[spec.metric]))
        if record.get("stopped"):
            trial.stopped_at = record["step"]
    return list(trials.values())


def choose_winner(trials: list[Trial], spec: SweepSpec) -> Trial:
    """The lowest final metric among the trials that trained their whole budget (ties: the first queued)."""
    finished = [t for t in trials if t.stopped_at is None and t.final is not None]
    if not finished:
        raise TrainingError(f"sweep of {spec.department!r}: no trial trained its whole budget; see metrics.jsonl")
    return min(finished, key=lambda t: t.final)


def sweep_record(spec: SweepSpec, trials: list[Trial], winner: Trial, halving: SuccessiveHalving) -> dict:
    finished = [t for t in trials if t.stopped_at is None]
    why = (
        f"lowest final {spec.metric} ({winner.final:.6g}) after the full budget of {spec.rungs.budget} steps "
        f"({len(finished)} of {len(trials)} trials reached it; the others stopped at rungs "
        f"{spec.rungs.steps()}, reduction factor {spec.rungs.reduction_factor})"
    )
    return {
        "department": spec.department,
        "metric": spec.metric,
        "sampler": spec.sampler,
        "seed": spec.seed,
        "space": spec.describe_space(),
        "rungs": {"steps": spec.rungs.steps(), **dataclasses.asdict(spec.rungs)},
        "trials": [t.to_dict() for t in trials],
        "decisions": [d.to_dict() for d in halving.decisions],
        "winner": {"trial": winner.name, "values": winner.values, spec.metric: winner.final, "why": why},
    }


def crown(spec: SweepSpec, winner: Trial, record: dict, destination: Path) -> Path:
    """The winner's weights as the department's adapter, its lineage carrying the sweep; registered
    under the department's name (the same weights: the same lineage id as the trial) and audited."""
    output = Path(spec.fleet.output)
    trial_dir = FleetDir(output).adapter(winner.name)
    shutil.copytree(trial_dir, destination)
    lineage = dataclasses.replace(
        read_lineage(trial_dir), name=spec.department, directory=str(destination.resolve()), sweep=record
    )
    write_lineage(lineage, destination, output)
    registry = Registry(output)
    try:
        registry.add(lineage)
    finally:
        registry.close()
    AuditLog(output).append(
        "sweep.winner",
        {"department": spec.department, "trial": winner.name, "directory": str(destination), "lineage_id": lineage.id},
    )
    return destination
