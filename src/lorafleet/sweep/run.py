"""`lorafleet sweep`: a sweep's trials trained as adapters of one fleet, halved at rungs, the best crowned.

Every trial is an adapter of one fleet run (train/trainer.py), so all trials, of every department
the sweep searches, share each forward and backward over the frozen base. Held-out evaluation at
the rungs is the trainer's batched no-grad pass; successive halving (sweep/asha.py), one per
department so that a trial is ranked only among its own department's trials, decides on its
numbers through the trainer's `stops_early`, and a stopped trial is saved as it stands, keeps its
metrics in metrics.jsonl, and hands its slot to the next queued trial in the same fleet step.
A department with `sampler: tpe` draws its trials as slots open, each from the rungs of its
department decided before it, its own study told every step's numbers and decisions; a sweep with
one hands every department's trials over in turn as slots open (sweep/tpe.py).

The trials are a fleet of their own in `<output>/trials/` (their adapters, metrics.jsonl, registry
and audit log), so that the output's `adapters/` holds the winners alone and `lorafleet serve
--fleet <output>` serves them, not every trial. A department's winner is its trial with the best
final metric (the lowest loss, or the highest reward) among those that trained their whole budget.
Its weights are copied to
`<output>/adapters/<department>/`, and its lineage (under the department's name, in the output's
registry) records the sweep: the space, every trial with its values, its metric curve and where
it stopped, why the winner won and where the trial lies. `sweep.json` in the output holds the
same for every department. With `retrain_full`, the winners' configurations train again, in a
fleet of their own, on the training and held-out files together, and that retraining becomes the
department's adapter; its record says so, and that the winner's metric is no longer held out.
`sweep.json` is written last, after the crowning: it marks the sweep finished.

A sweep resumes (`--resume`) from the trials' fleet checkpoints (train/checkpoint.py): stopped
trials are finished there like any other. Successive halving's state is not in a checkpoint; it is
rebuilt by replaying the metrics.jsonl lines up to the checkpoint's fleet step, a fleet step at a
time in the order the trials ran, through the same rule, so the decisions are the same by
construction (each replayed decision is checked against the `stopped` mark of its line). A sweep
drawing its trials as slots open keeps the drawing in each checkpoint (the TPE studies whole, with
their samplers' random state, and whose turn is next: sweep/tpe.py) and continues it, the trials
handed over by then back in the fleet in the order they joined; the restored studies were told
up to the checkpoint already, so the replay is not told to them again. The sweep
the trials started from is kept in `trials/sweep-spec.json`; resuming under a changed sweep file
is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.config import AdapterSpec
from lorafleet.data.join import join_jsonl
from lorafleet.data.records import read_jsonl_lines
from lorafleet.errors import ConfigError, TrainingError
from lorafleet.fleet_dir import SWEEP, FleetDir, checkpoint_step
from lorafleet.governance.audit import AuditLog
from lorafleet.governance.lineage import read_lineage, sha256_file, write_lineage
from lorafleet.governance.registry import register
from lorafleet.models.loading import FrozenBase
from lorafleet.sweep.asha import SuccessiveHalving
from lorafleet.sweep.progress import SweepProgress
from lorafleet.sweep.space import DepartmentSearch, SweepSpec
from lorafleet.sweep.tpe import DrawnTrials, TPETrials
from lorafleet.train import checkpoint, distributed
from lorafleet.train.job import AdapterJob
from lorafleet.train.trainer import FleetTrainer

if TYPE_CHECKING:
    import optuna

SWEEP_FILE = SWEEP
RETRAIN_DIR = "retrain"  # --retrain-full's fleet, inside the sweep's output
SPEC_FILE = "sweep-spec.json"  # in trials/: the sweep the trials started from, for --resume
# fleet settings a resumed sweep may change: they decide no weight and no rung
NOT_DECIDING = ("checkpoint_every", "keep_checkpoints")
Arrival = tuple[str, int, dict[str, float]]  # a trial evaluated in a fleet step: name, optimizer step, numbers


@dataclass
class Trial:
    name: str
    values: dict  # the searched fields' values
    curve: list[tuple[int, float]]  # (optimizer step, metric) at each held-out evaluation
    steps: int  # optimizer steps trained
    stopped_at: int | None  # the rung it stopped at; None: it trained its whole budget
    diverged: bool = False  # stopped at `stopped_at` because its loss was no longer a number (never saved)

    @property
    def final(self) -> float | None:
        return self.curve[-1][1] if self.curve else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "final": self.final}


@dataclass
class SweepResult:
    """One department's outcome."""

    department: str
    winner: str  # the winning trial
    adapter: Path  # the department's adapter: the winner's weights, or its retraining on all the data
    trials: list[Trial]
    record: dict  # what sweep.json and the department's lineage hold
    study: optuna.Study | None = None  # sampler: tpe: the department's Optuna study, told every rung


def run_sweep(
    spec: SweepSpec,
    progress: bool = True,
    base: FrozenBase | None = None,
    retrain_full: bool = False,
    resume: bool = False,
) -> dict[str, SweepResult]:
    """Train every trial of `spec` in one fleet with successive halving per department; save each
    department's winner as its adapter in `<output>/adapters/<department>/` (with `retrain_full`,
    the winner's configuration trained again on the training and held-out files together).
    `resume`: continue a killed sweep from its last checkpoint."""
    if distributed.launched():  # every process would run the whole sweep and crown its own winner
        raise ConfigError("lorafleet sweep runs on one process; start it without torchrun")
    output, trials_fleet = FleetDir(spec.output), FleetDir(spec.fleet.output)
    halvings = {
        department: SuccessiveHalving(search.rungs, search.higher_is_better)
        for department, search in spec.departments.items()
    }
    studies = {d: TPETrials(search) for d, search in spec.departments.items() if search.sampler == "tpe"}
    decide = per_department(spec, halvings, studies)
    if resume:
        latest = checkpoint_to_resume(spec)
        drawn = resumed_drawing(spec, studies, latest)
        # the studies were restored as they had been told: the replay rebuilds the halvings alone
        replay_decisions(per_department(spec, halvings, {}), spec, latest)
        for department in spec.departments:  # a crowning the kill cut short
            shutil.rmtree(output.adapter(department), ignore_errors=True)
    else:
        start_fresh(spec)
        drawn = DrawnTrials(spec, studies) if studies else None

    def stops_early(evaluated: list[tuple[AdapterJob, dict[str, float]]]) -> set[str]:
        finished = {job.name for job, _ in evaluated if job.done}
        return decide([(job.name, job.optimizer_step, numbers) for job, numbers in evaluated], finished)

    def next_adapter() -> AdapterSpec | None:
        fail_diverged(studies, trainer.result.diverged)  # before the study is asked: TPE models them as failed
        return drawn.next_adapter()

    display = SweepProgress(spec.departments, shown=progress)
    # a trial whose loss breaks stops alone (stops_diverged): the others are still worth finishing
    trainer = FleetTrainer(
        spec.fleet,
        base=base,
        progress=progress,
        stops_early=stops_early,
        stops_diverged=True,
        display=display,
        next_adapter=next_adapter if drawn and not drawn.exhausted else None,
        checkpoint_extra=drawn.saved if drawn else None,
    )
    trainer.run(resume=resume)
    fail_diverged(studies, trainer.result.diverged)  # those after the last draw
    outcomes = {}
    for department, search in spec.departments.items():
        trials = read_trials(search, trials_fleet.metrics)
        winner = choose_winner(trials, search)
        record = sweep_record(search, trials, winner, halvings[department])
        # where the trial itself lies, relative to the output (its lineage and registry row are the trials' own)
        record["winner"]["trial_directory"] = str(trials_fleet.adapter(winner.name).relative_to(spec.output))
        if department in studies:
            record["tpe"] = studies[department].describe()
        outcomes[department] = (trials, winner, record)
    sources = {department: trials_fleet.adapter(winner.name) for department, (_, winner, _) in outcomes.items()}
    if retrain_full:
        winners = {department: winner.name for department, (_, winner, _) in outcomes.items()}
        sources = retrain_winners(spec, winners, progress, trainer.base)
        for department, (_, _, record) in outcomes.items():
            record["retrained"] = retraining_record(spec, department, winners[department], record)
    results = {}
    for department, (trials, winner, record) in outcomes.items():
        adapter = crown(spec, department, winner, record, sources[department])
        study = studies[department].study if department in studies else None
        results[department] = SweepResult(department, winner.name, adapter, trials, record, study)
    records = [record for _, _, record in outcomes.values()]
    (spec.output / SWEEP_FILE).write_text(json.dumps({"departments": records}, indent=2) + "\n")  # last: done
    return results


def start_fresh(spec: SweepSpec) -> None:
    """Refuse an output that holds a sweep already; keep the sweep the trials start from."""
    if checkpoint.latest_checkpoint(spec.fleet.output) is not None:
        raise ConfigError(
            f"{spec.fleet.output} holds checkpoints of an earlier sweep; continue it with lorafleet sweep "
            "SWEEP.yaml --resume, or choose another output"
        )
    for department in spec.departments:
        if FleetDir(spec.output).adapter(department).exists():
            raise ConfigError(
                f"{FleetDir(spec.output).adapter(department)} exists already; choose another output for the sweep "
                "or move it away"
            )
    Path(spec.fleet.output).mkdir(parents=True, exist_ok=True)
    (Path(spec.fleet.output) / SPEC_FILE).write_text(json.dumps(started_from(spec), indent=2) + "\n")


def fail_diverged(studies: dict[str, TPETrials], diverged: list[str]) -> None:
    """Tell each TPE study its trials whose loss broke as failed (they never reach a rung decision)."""
    for study in studies.values():
        study.fail(diverged)


def started_from(spec: SweepSpec) -> dict:
    """What decides a sweep's trials and rungs, as JSON holds it: compared when it resumes."""
    departments = {
        name: {
            "metric": search.metric,
            "sampler": search.sampler,
            "seed": search.seed,
            "space": search.describe_space(),
            "asha": dataclasses.asdict(search.rungs),
            "trials": search.trials,
        }
        for name, search in spec.departments.items()
    }
    fleet = {k: v for k, v in dataclasses.asdict(spec.fleet).items() if k not in NOT_DECIDING}
    return json.loads(json.dumps({"departments": departments, "fleet": fleet}))


def check_same_sweep(started: dict, now: dict) -> None:
    """A sweep resumes only under the sweep file it started from (checkpoint settings aside)."""
    what = None
    if list(started["departments"]) != list(now["departments"]):
        what = "departments"
    for department, fields in started["departments"].items():
        changed = [key for key in fields if fields[key] != now["departments"].get(department, {}).get(key)]
        what = what or (f"{department}: {changed[0]}" if changed else None)
    changed = [key for key in started["fleet"] if started["fleet"][key] != now["fleet"].get(key)]
    if changed and what is None:
        what = "adapter (a field every trial shares)" if changed[0] == "adapters" else f"fleet: {changed[0]}"
    if what is not None:
        raise ConfigError(
            f"--resume: the sweep file changed since the sweep started ({what} differs); restore it, "
            "or start the changed sweep in another output"
        )


def checkpoint_to_resume(spec: SweepSpec) -> Path:
    """The trials' last checkpoint, once the sweep is known to be unfinished and unchanged since it started."""
    trials = FleetDir(spec.fleet.output)
    if (spec.output / SWEEP_FILE).exists():
        raise ConfigError(f"--resume: the sweep in {spec.output} finished already; its result is {SWEEP_FILE}")
    latest = checkpoint.latest_checkpoint(trials.root)
    if latest is None or not (trials.root / SPEC_FILE).exists():
        raise ConfigError(
            f"--resume: no checkpoint of a sweep in {trials.checkpoints} (a sweep checkpoints every "
            f"{spec.fleet.checkpoint_every} fleet steps); start it again without --resume"
        )
    check_same_sweep(json.loads((trials.root / SPEC_FILE).read_text()), started_from(spec))
    return latest


def resumed_drawing(spec: SweepSpec, studies: dict[str, TPETrials], latest: Path) -> DrawnTrials | None:
    """A sweep drawing its trials as slots open continues the drawing kept in its checkpoint
    `latest` (sweep/tpe.py), the trials it had handed over back in the fleet as the checkpoint holds them."""
    if not studies:
        return None
    state = checkpoint.load_checkpoint(latest)
    if "extra" not in state:
        raise ConfigError(
            f"--resume: {latest} does not keep the sweep's TPE studies (it was written by an older lorafleet); "
            "start the sweep again in another output"
        )
    drawn = DrawnTrials(spec, studies)
    drawn.restore(state["extra"], handed=[adapter["name"] for adapter in state["spec"]])
    return drawn


def replay_decisions(decide: Callable[..., set[str]], spec: SweepSpec, latest: Path) -> None:
    """Rebuild the successive halvings behind `decide` as they stood at the checkpoint `latest`:
    the metrics.jsonl lines up to its fleet step (those a resumed trainer keeps), a fleet step at a
    time in the order the trials ran."""
    trials = FleetDir(spec.fleet.output)
    metric_of = {trial: search.metric for search in spec.departments.values() for trial in search.trials}
    upto, by_step = checkpoint_step(latest), {}
    for line in trials.metrics.read_text().splitlines():
        record = json.loads(line)
        if record["fleet_step"] <= upto and not record.get("diverged"):
            by_step.setdefault(record["fleet_step"], []).append(record)
    for fleet_step, records in sorted(by_step.items()):
        stopped = decide([(r["adapter"], r["step"], r) for r in records if metric_of[r["adapter"]] in r])
        marked = {r["adapter"] for r in records if r.get("stopped")}
        if stopped != marked:  # the metrics were not written by this sweep's rungs
            raise ConfigError(
                f"--resume: at fleet step {fleet_step} {trials.metrics} stopped {sorted(marked)} but the sweep "
                f"file's rungs stop {sorted(stopped)}; start the sweep again in another output"
            )


def per_department(
    spec: SweepSpec, halvings: dict[str, SuccessiveHalving], studies: dict[str, TPETrials]
) -> Callable[..., set[str]]:
    """The rung decision of a fleet step's evaluated trials (the trainer's `stops_early`, and a
    resumed sweep's replay): each department's arrivals go to its own successive halving, so a
    trial is ranked only among its own department's trials, and a TPE department's study is told
    them, the decisions and which of them `finished` their budget (its trials are drawn as the
    sweep runs, so a trial's department is looked up as it arrives)."""

    def stops_early(evaluated: list[Arrival], finished: set[str] = frozenset()) -> set[str]:
        stopping = set()
        for department, halving in halvings.items():
            search = spec.departments[department]
            arrivals = [
                (name, step, numbers[search.metric]) for name, step, numbers in evaluated if name in search.trials
            ]
            stopped = halving.stopping(arrivals)
            if department in studies:
                studies[department].tell(arrivals, stopped, finished & {name for name, _, _ in arrivals})
            stopping |= stopped
        return stopping

    return stops_early


def read_trials(spec: DepartmentSearch, metrics: Path) -> list[Trial]:
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
            trial.diverged = bool(record.get("diverged"))
    return list(trials.values())


def choose_winner(trials: list[Trial], spec: DepartmentSearch) -> Trial:
    """The best final metric (the lowest, or the highest for a reward) among the trials that
    trained their whole budget (ties: the first queued); a diverged trial stopped, so it never wins."""
    finished = [t for t in trials if t.stopped_at is None and t.final is not None]
    if not finished:
        raise TrainingError(f"sweep of {spec.department!r}: no trial trained its whole budget; see metrics.jsonl")
    best = max if spec.higher_is_better else min
    return best(finished, key=lambda t: t.final)


def sweep_record(spec: DepartmentSearch, trials: list[Trial], winner: Trial, halving: SuccessiveHalving) -> dict:
    finished = [t for t in trials if t.stopped_at is None]
    why = (
        f"{'highest' if spec.higher_is_better else 'lowest'} final {spec.metric} ({winner.final:.6g}) "
        f"after the full budget of {spec.rungs.budget} steps "
        f"({len(finished)} of {len(trials)} trials reached it; the others stopped at rungs "
        f"{spec.rungs.steps()}, reduction factor {spec.rungs.reduction_factor})"
    )
    diverged = [t.name for t in trials if t.diverged]
    if diverged:
        why += f"; {', '.join(diverged)} diverged (the loss was no longer a number) and could not win"
    return {
        "department": spec.department,
        "metric": spec.metric,
        "sampler": spec.sampler,
        "seed": spec.seed,
        "space": spec.describe_space(),
        "rungs": {"steps": spec.rungs.steps(), **dataclasses.asdict(spec.rungs)},
        "trials": [t.to_dict() for t in trials],
        "decisions": [d.to_dict() for d in halving.decisions],
        "diverged": diverged,
        "winner": {"trial": winner.name, "values": winner.values, spec.metric: winner.final, "why": why},
    }


def retrain_winners(spec: SweepSpec, winners: dict[str, str], progress: bool, base: FrozenBase) -> dict[str, Path]:
    """Each department's winning configuration (department -> trial) trained again on its training
    and held-out files together, the full budget with no rungs, all departments in one fleet of its
    own in `<output>/retrain/` on the sweep's loaded base (the trials' weights stay where they
    are); where each was saved."""
    retrain = FleetDir(spec.output / RETRAIN_DIR)
    trials = {adapter.name: adapter for adapter in spec.fleet.adapters}
    adapters = []
    for department, trial in winners.items():
        winning = trials[trial]
        everything = [Path(winning.data), Path(winning.eval_data)]
        data = join_jsonl(everything, retrain.root / "data" / f"{department}.jsonl")
        adapters.append(dataclasses.replace(winning, name=department, data=str(data), eval_data=None, eval_every=None))
    # no checkpoints: a resumed sweep trains the retraining again from its start
    fleet = dataclasses.replace(spec.fleet, output=str(retrain.root), adapters=adapters, checkpoint_every=0)
    return FleetTrainer(fleet, base=base, progress=progress).run().adapters


def retraining_record(spec: SweepSpec, department: str, trial: str, record: dict) -> dict:
    """What the sweep record says of a retrained winner: its data, and that the winner's metric is
    not a held-out number for the retrained adapter (it trained on the held-out file)."""
    winning = next(adapter for adapter in spec.fleet.adapters if adapter.name == trial)
    files = [Path(winning.data), Path(winning.eval_data)]
    metric = record["metric"]
    return {
        "trial": trial,
        "steps": winning.steps,
        "data": [
            {"path": str(path.resolve()), "sha256": sha256_file(path), "records": len(read_jsonl_lines(path))}
            for path in files
        ],
        "held_out": f"none: retrained on {files[1]} too, so the winner's {metric} "
        f"({record['winner'][metric]:.6g}) was measured on data this adapter trained on and is not a held-out "
        "number for it; evaluate it on data it has not seen",
    }


def crown(spec: SweepSpec, department: str, winner: Trial, record: dict, source: Path) -> Path:
    """The weights in `source` (the winning trial's, or its retraining) as the department's adapter,
    its lineage carrying the sweep; registered under the department's name (the trial's own weights:
    the same lineage id as the trial) and audited."""
    output = spec.output
    destination = FleetDir(output).adapter(department)
    shutil.copytree(source, destination)
    lineage = dataclasses.replace(
        read_lineage(source), name=department, directory=str(destination.resolve()), sweep=record
    )
    write_lineage(lineage, destination, output)
    register(output, lineage)
    AuditLog(output).append(
        "sweep.winner",
        {
            "department": department,
            "trial": winner.name,
            "retrained_on_all_data": "retrained" in record,
            "directory": str(destination),
            "lineage_id": lineage.id,
        },
    )
    return destination
