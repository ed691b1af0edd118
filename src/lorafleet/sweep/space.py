"""A sweep file: the search space over adapter spec fields, its samplers, and the trials they draw.

A sweep file searches one department's adapter or several at once. For one, `department` names it
and the top level holds its search: the fields every trial shares (`adapter`, as in a fleet file,
without a name), the fields to search (`space`), how to draw them (`sampler`: grid or a seeded
random draw, or Optuna's TPE, which draws each trial while the sweep runs from the rungs decided
before it: sweep/tpe.py), how many trials, and the successive-halving rungs (`asha`). For several,
`departments` maps each name to its own search with the same fields; what the top level holds is
the default for every department: a department's `adapter` is laid over the shared one field by
field, and its other fields replace the shared ones. All departments' trials train in one fleet
(queued in turn, one of each department), and each department's trials are ranked only among
themselves. Each trial becomes an ordinary adapter spec named `<department>-trial<NN>`, validated
as a fleet file is, so a misspelt field names the sweep file, the department and the field. The
trials train as a fleet of their own in `<output>/trials/`; the output's own `adapters/` receives
the winners alone.

A dimension of the space is one of:

  learning_rate: {log_uniform: [1e-4, 1e-2]}   drawn uniformly in log space (random and tpe samplers)
  dropout:       {uniform: [0.0, 0.1]}          drawn uniformly (random and tpe samplers)
  rank:          {choice: [4, 8, 16]}           one of the values (the grid takes each in turn)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.config import (
    AdapterSpec,
    FleetSpec,
    adapter_name_problem,
    fleet_spec_from_dict,
    read_yaml,
    resolve_paths,
)
from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.train.objectives import objective_for

SAMPLERS = ("grid", "random", "tpe")
KINDS = ("choice", "log_uniform", "uniform")
# What a sweep can rank trials on: the numbers the held-out pass reports (train/held_out.py), and
# whether a trial is better with the number lower or higher. SFT reports eval_loss; DPO and MPO
# also their reward margin and accuracy (the chosen answer preferred over the rejected one).
METRICS = {"eval_loss": "lower", "eval_reward_margin": "higher", "eval_reward_accuracy": "higher"}
SEARCH_FIELDS = ("adapter", "space", "sampler", "trials", "seed", "metric", "asha", "startup_trials")  # per department
FIELDS = ("base", "output", "department", "departments", "fleet", *SEARCH_FIELDS)


@dataclass(frozen=True)
class Dimension:
    """One searched field: `kind` is choice, log_uniform or uniform; `values` the choices or [low, high]."""

    name: str
    kind: str
    values: tuple

    def draw(self, rng: random.Random) -> object:
        if self.kind == "choice":
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "uniform":
            return rng.uniform(low, high)
        return math.exp(rng.uniform(math.log(low), math.log(high)))


@dataclass(frozen=True)
class Rungs:
    """Successive halving: a rung every `min_steps` x `reduction_factor`^k optimizer steps below the
    budget; at each, a trial continues only while among the best 1/reduction_factor there so far."""

    min_steps: int
    reduction_factor: int
    budget: int

    def steps(self) -> list[int]:
        rungs, step = [], self.min_steps
        while step < self.budget:
            rungs.append(step)
            step *= self.reduction_factor
        return rungs


@dataclass
class DepartmentSearch:
    """One department's search: its trials are ranked only among themselves, its best becomes its adapter."""

    department: str
    space: list[Dimension]
    sampler: str
    rungs: Rungs
    metric: str = "eval_loss"
    seed: int = 0
    trials: dict[str, dict] = field(default_factory=dict)  # trial name -> the values drawn for it
    # tpe: the trials to draw while the sweep runs (`trials` fills as they are), the first
    # `startup_trials` of them at random, and how a drawn trial becomes an adapter spec
    trial_count: int = 0
    startup_trials: int = 10
    new_trial: Callable[[str, dict], AdapterSpec] | None = None

    def describe_space(self) -> dict:
        return {d.name: {d.kind: list(d.values)} for d in self.space}

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric] == "higher"


@dataclass
class SweepSpec:
    fleet: FleetSpec  # every department's trials as adapters of one fleet, in the order they are queued
    departments: dict[str, DepartmentSearch]  # in the sweep file's order

    @property
    def output(self) -> Path:
        """The sweep's output: the winners' fleet, holding the trials' own fleet in `trials/`."""
        return Path(self.fleet.output).parent


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; relative paths are taken from its directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = read_yaml(path, "sweep file")
    return sweep_spec_from_dict(raw, str(path), path.resolve().parent)


def sweep_spec_from_dict(raw: object, where: str, root: Path | None = None) -> SweepSpec:
    """The sweep of a parsed sweep file (`where` names it in errors); relative paths from `root`."""
    _check_fields(raw, where)
    searches, trial_adapters = {}, []
    for department, (fields, here) in _department_fields(raw, where).items():
        searches[department], adapters = _department_search(raw, department, fields, here, root)
        trial_adapters.append(adapters)
    trial_names = {adapter["name"] for adapters in trial_adapters for adapter in adapters} | {
        trial_name(search.department, index) for search in searches.values() for index in range(search.trial_count)
    }
    if clash := sorted(set(searches) & trial_names):
        raise ConfigError(f"{where}: department {clash[0]!r} has the name of another department's trial; rename it")
    first_rung = min(search.rungs.min_steps for search in searches.values())
    fleet = _trial_fleet(raw, _interleaved(trial_adapters), first_rung, where)
    if root is not None:
        resolve_paths(fleet, root)
    listed = {name for search in searches.values() for name in search.trials}
    fleet.adapters = [adapter for adapter in fleet.adapters if adapter.name in listed]  # tpe: checked, drawn later
    return SweepSpec(fleet, searches)


def trial_name(department: str, index: int) -> str:
    return f"{department}-trial{index:02d}"


def _check_fields(raw: object, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with base, output, department, adapter, space and trials")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(FIELDS)}")
    for required in ("base", "output"):
        if required not in raw:
            raise ConfigError(f"{where}: missing required field {required!r}")
    if ("department" in raw) == ("departments" in raw):
        raise ConfigError(
            f"{where}: give 'department' (the one department searched) or 'departments' (a mapping of several, "
            "each with its own adapter, space and trials), one of them"
        )


def _department_fields(raw: dict, where: str) -> dict[str, tuple[dict, str]]:
    """Each department's search fields (the top level's under its own) and how its errors name it."""
    shared = {key: raw[key] for key in SEARCH_FIELDS if key in raw}
    if "department" in raw:
        return {raw["department"]: (shared, where)}
    departments = _mapping(raw["departments"], f"{where}: departments")
    if not departments:
        raise ConfigError(f"{where}: departments is empty; name at least one department and its search")
    fields = {}
    for name, own in departments.items():
        here = f"{where}: departments: {name}"
        own = _mapping({} if own is None else own, here)
        if unknown := sorted(set(own) - set(SEARCH_FIELDS)):
            raise ConfigError(f"{here}: unknown field {unknown[0]!r}; a department takes {', '.join(SEARCH_FIELDS)}")
        adapter = _mapping(shared.get("adapter", {}), f"{where}: adapter") | _mapping(
            own.get("adapter", {}), f"{here}: adapter"
        )
        fields[name] = ({**shared, **own, "adapter": adapter}, here)
    return fields


def _department_search(
    raw: dict, department: object, fields: dict, where: str, root: Path | None
) -> tuple[DepartmentSearch, list[dict]]:
    """One department's search and its trials as adapter specs (validated here, so that an error
    names the department). A tpe department's trials are drawn while the sweep runs: its one
    adapter here is a first trial at the low end of every dimension, checked with the others so a
    wrong field fails before anything trains, and left out of the fleet."""
    if problem := adapter_name_problem(department):
        raise ConfigError(f"{where}: department: {problem}" if "department" in raw else f"{where}: {problem}")
    for required in ("adapter", "space"):
        if required not in fields:
            raise ConfigError(f"{where}: missing required field {required!r}")
    space = _space(fields["space"], f"{where}: space")
    sampler, metric, seed = _sampler_metric_seed(fields, where)
    adapter = _shared_adapter(fields["adapter"], f"{where}: adapter")
    rungs = _rungs(fields.get("asha", {}), adapter["steps"], f"{where}: asha")
    trials = {
        trial_name(department, index): values
        for index, values in enumerate(draw_trials(space, sampler, fields.get("trials"), seed, where))
    }
    search = DepartmentSearch(department, space, sampler, rungs, metric, seed, trials)
    if sampler == "tpe":
        search.trial_count, search.startup_trials = fields["trials"], _startup_trials(fields, where)
        search.new_trial = functools.partial(_drawn_trial, raw, adapter, rungs, where, root)
        trials = {trial_name(department, 0): {d.name: d.values[0] for d in space}}
    elif "startup_trials" in fields:
        raise ConfigError(f"{where}: startup_trials is for sampler: tpe only; leave it out")
    adapters = [_trial_fields(adapter, rungs, name, values) for name, values in trials.items()]
    checked = fleet_spec_from_dict({"base": raw["base"], "output": raw["output"], "adapters": adapters}, where)
    _check_metric_reported(metric, checked.adapters, where)
    return search, adapters


def _check_metric_reported(metric: str, adapters: list[AdapterSpec], where: str) -> None:
    """Every trial's held-out pass reports the metric (a reward needs a preference objective)."""
    for adapter in adapters:
        reported = objective_for(adapter).held_out_names
        if metric not in reported:
            raise ConfigError(
                f"{where}: metric {metric!r} is not reported for {adapter.name} (objective: {adapter.objective}); "
                f"its held-out pass reports {', '.join(reported)}"
            )


def _trial_fields(adapter: dict, rungs: Rungs, name: str, values: dict) -> dict:
    """A trial's adapter fields: the shared ones with its drawn values, evaluated at every rung."""
    return {**adapter, **values, "name": name, "eval_every": rungs.min_steps}


def _startup_trials(fields: dict, where: str) -> int:
    startup = fields.get("startup_trials", 10)
    if not isinstance(startup, int) or isinstance(startup, bool) or startup < 1:
        raise ConfigError(f"{where}: startup_trials must be a whole number of at least 1, got {startup!r}")
    require_optuna(f"{where}: sampler: tpe")
    return startup


def require_optuna(what: str):
    """The optuna module, or a ConfigError saying which extra to install."""
    try:
        import optuna
    except ImportError as err:
        raise ConfigError(f"{what} needs optuna, an optional extra: pip install 'lorafleet[sweep]'") from err
    return optuna


def _drawn_trial(
    raw: dict, adapter: dict, rungs: Rungs, where: str, root: Path | None, name: str, values: dict
) -> AdapterSpec:
    """The adapter spec of one trial drawn while the sweep runs, validated as a fleet file is."""
    # only the trial's adapter is kept: the fleet around it (its checkpoints among them) is the sweep's
    fleet = _trial_fleet(raw, [_trial_fields(adapter, rungs, name, values)], rungs.min_steps, where)
    if root is not None:
        resolve_paths(fleet, root)
    return fleet.adapters[0]


def _sampler_metric_seed(fields: dict, where: str) -> tuple[str, str, int]:
    sampler, metric, seed = fields.get("sampler", "random"), fields.get("metric", "eval_loss"), fields.get("seed", 0)
    if sampler not in SAMPLERS:
        raise ConfigError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if metric not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: seed must be a whole number, got {seed!r}")
    return sampler, metric, seed


def _interleaved(departments: list[list[dict]]) -> list[dict]:
    """One trial of each department in turn: every department's search starts in the first steps."""
    return [adapter for turn in itertools.zip_longest(*departments) for adapter in turn if adapter is not None]


def _shared_adapter(raw: object, where: str) -> dict:
    """The adapter fields every trial shares: a budget in steps and a held-out file are required."""
    adapter = _mapping(raw, where)
    if "name" in adapter:
        raise ConfigError(f"{where}: leave out 'name'; trials are named after the department")
    steps = adapter.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ConfigError(f"{where}: 'steps' (each trial's budget in optimizer steps) must be a whole number >= 2")
    if adapter.get("eval_data") is None:
        raise ConfigError(f"{where}: 'eval_data' (the held-out file the rungs compare trials on) is required")
    return adapter


def _trial_fleet(raw: dict, adapters: list[dict], first_rung: int, where: str) -> FleetSpec:
    """One fleet whose adapters are the trials, each evaluated at every rung, validated as a fleet file is."""
    fleet = _mapping(raw.get("fleet", {}), f"{where}: fleet")
    # a checkpoint every first rung's min_steps fleet steps by default (for --resume); the rung
    # decisions are not in it: a resumed sweep replays them from metrics.jsonl (sweep/run.py)
    fleet = {"checkpoint_every": first_rung, **fleet}
    # the trials are a fleet of their own inside the output, whose adapters/ receives the winners alone
    output = str(FleetDir(raw["output"]).trials) if isinstance(raw["output"], str) else raw["output"]
    fleet = {**fleet, "base": raw["base"], "output": output, "adapters": adapters}
    return fleet_spec_from_dict(fleet, where)


def draw_trials(space: list[Dimension], sampler: str, trials: object, seed: int, where: str) -> list[dict]:
    """The values of each trial: every combination of the choices (grid; `trials` caps it), or
    `trials` independent draws from a generator seeded with `seed` (random)."""
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"{where}: trials must be a whole number of at least 1, got {trials!r}")
    if sampler == "grid":
        continuous = [d for d in space if d.kind != "choice"]
        if continuous:
            raise ConfigError(
                f"{where}: the grid sampler takes choice dimensions only; {continuous[0].name} is "
                f"{continuous[0].kind} (list its values as a choice, or use sampler: random or tpe)"
            )
        grid = [
            dict(zip([d.name for d in space], combination, strict=True))
            for combination in itertools.product(*(d.values for d in space))
        ]
        return grid[:trials] if trials else grid
    if trials is None:
        raise ConfigError(f"{where}: the {sampler} sampler needs 'trials' (how many to draw)")
    if sampler == "tpe":  # drawn while the sweep runs (sweep/tpe.py)
        return []
    rng = random.Random(seed)
    return [{d.name: d.draw(rng) for d in space} for _ in range(trials)]


def _space(raw: object, where: str) -> list[Dimension]:
    searchable = {f.name for f in dataclasses.fields(AdapterSpec)} - {
        "name",
        "data",
        "eval_data",
        "eval_every",
        "steps",
    }
    space = []
    for name, dimension in _mapping(raw, where).items():
        if name not in searchable:
            raise ConfigError(
                f"{where}: {name!r} is not a searchable adapter field; use one of {', '.join(sorted(searchable))}"
            )
        if not isinstance(dimension, dict) or len(dimension) != 1 or next(iter(dimension)) not in KINDS:
            raise ConfigError(
                f"{where}: {name} must be one of {{choice: [...]}}, {{log_uniform: [low, high]}}, "
                "{uniform: [low, high]}"
            )
        kind, values = next(iter(dimension.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {name}: {kind} takes a non-empty list")
        if kind != "choice" and (
            len(values) != 2 or not values[0] < values[1] or (kind == "log_uniform" and values[0] <= 0)
        ):
            raise ConfigError(
                f"{where}: {name}: {kind} takes [low, high] with low < high (and low > 0 for log_uniform)"
            )
        space.append(Dimension(name, kind, tuple(values)))
    if not space:
        raise ConfigError(f"{where}: name at least one field to search")
    return space


def _rungs(raw: object, budget: int, where: str) -> Rungs:
    raw = _mapping(raw, where)
    min_steps, factor = raw.get("min_steps", max(budget // 9, 1)), raw.get("reduction_factor", 3)
    if not isinstance(min_steps, int) or not 1 <= min_steps < budget:
        raise ConfigError(
            f"{where}: min_steps must be a whole number from 1 to below the budget ({budget}), got {min_steps!r}"
        )
    if not isinstance(factor, int) or factor < 2:
        raise ConfigError(f"{where}: reduction_factor must be a whole number of at least 2, got {factor!r}")
    return Rungs(min_steps, factor, budget)


def _mapping(raw: object, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw
