"""Optuna's TPE sampler for a sweep, through its ask-and-tell interface, and the turns in which a
sweep with a TPE department hands the trainer its trials.

A TPE department draws its trials while the fleet trains: whenever a slot is free, no trial is
queued and it is the department's turn, its study is asked for the next trial's values, so each
is modelled on every rung decided before it. Each department searched with TPE has a study of its
own, told only its own trials: each held-out evaluation of a trial as an intermediate value
(`report`), a trial stopped at a rung as pruned, one that trains its whole budget its final
metric, and one whose final metric is not a number, or whose loss broke while it trained (a
diverged trial, stopped alone by the trainer before any rung), as failed (left out of TPE's
model); TPE ranks pruned trials by the last step they reached and their value there. The rung decisions stay
successive halving's (sweep/asha.py): the sampler is Optuna's, the pruner is not.

In a sweep with a TPE department every trial joins the fleet through the trainer's `next_adapter`
(`DrawnTrials`; the fleet starts empty): when a slot opens the departments take turns, in the sweep
file's order, among those with trials left to hand over, a grid or random department its next
listed trial and a TPE department a trial asked of its study. A sweep of listed departments alone
thus queues in the same order with or without a TPE department beside it, and no department waits
for another's trials to be drawn first.

A choice dimension is a categorical over the positions of its values: a choice may list lists
(target modules), which Optuna's categoricals do not hold. optuna is an optional extra
(`pip install 'lorafleet[sweep]'`), imported only when a TPE sweep starts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from lorafleet.config import AdapterSpec
from lorafleet.sweep.space import DepartmentSearch, Dimension, SweepSpec, require_optuna, trial_name

if TYPE_CHECKING:
    import optuna


class TPETrials:
    """One department's trials as an Optuna study asks them, told what its rungs measured."""

    def __init__(self, spec: DepartmentSearch) -> None:
        optuna = require_optuna(f"sweep of {spec.department!r}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials)
        direction = "maximize" if spec.higher_is_better else "minimize"
        self.study = optuna.create_study(direction=direction, sampler=sampler)
        self.spec = spec
        self.distributions = {d.name: _distribution(optuna, d) for d in spec.space}
        self.running: dict[str, optuna.Trial] = {}
        self.told: list[str] = []  # trials finished in the study (pruned or complete), in the order told
        self.informed_by: dict[str, list[str]] = {}  # trial -> the trials told before it was asked

    def next_adapter(self) -> AdapterSpec | None:
        """The next trial, its values asked of the study now; None once the department's trials
        are all drawn."""
        if len(self.spec.trials) >= self.spec.trial_count:
            return None
        trial = self.study.ask(self.distributions)
        values = {d.name: _value(d, trial.params[d.name]) for d in self.spec.space}
        name = trial_name(self.spec.department, trial.number)
        self.spec.trials[name] = values
        self.running[name] = trial
        self.informed_by[name] = list(self.told)
        return self.spec.new_trial(name, values)

    def tell(self, arrivals: list[tuple[str, int, float]], stopped: set[str], finished: set[str]) -> None:
        """Tell the study a fleet step's held-out numbers of its department's trials ((trial,
        optimizer step, metric)), the trials the rungs `stopped` and those that `finished` their
        whole budget."""
        from optuna.trial import TrialState

        for name, step, value in arrivals:
            trial = self.running[name]
            if math.isfinite(value):
                trial.report(value, step)
            if name in stopped:
                self._finish(name, state=TrialState.PRUNED)
            elif name in finished and math.isfinite(value):
                self._finish(name, values=value)
            elif name in finished:  # no number to rank it by: failed, left out of TPE's model
                self._finish(name, state=TrialState.FAIL)

    def fail(self, diverged: list[str]) -> None:
        """Tell the study that those of its running trials among `diverged` failed: their loss broke,
        so they stopped unsaved, never reaching a rung decision (left out of TPE's model)."""
        from optuna.trial import TrialState

        for name in diverged:
            if name in self.running:
                self._finish(name, state=TrialState.FAIL)

    def describe(self) -> dict:
        """What the sweep record keeps of the sampler: its random start and what each trial was drawn from."""
        return {"startup_trials": self.spec.startup_trials, "informed_by": self.informed_by}

    def _finish(self, name: str, **outcome) -> None:
        self.study.tell(self.running.pop(name), **outcome)
        self.told.append(name)


def _distribution(optuna, dimension: Dimension) -> optuna.distributions.BaseDistribution:
    if dimension.kind == "choice":
        return optuna.distributions.CategoricalDistribution(tuple(range(len(dimension.values))))
    low, high = dimension.values
    return optuna.distributions.FloatDistribution(low, high, log=dimension.kind == "log_uniform")


def _value(dimension: Dimension, param: object) -> object:
    return dimension.values[param] if dimension.kind == "choice" else param


class DrawnTrials:
    """Every department's trials handed to the trainer's `next_adapter`, one department after
    another in turn: a listed department's next trial, or a TPE department's asked of its study."""

    def __init__(self, spec: SweepSpec, studies: dict[str, TPETrials]) -> None:
        self.sources: dict[str, Callable[[], AdapterSpec | None]] = {}
        for department, search in spec.departments.items():
            if department in studies:
                self.sources[department] = studies[department].next_adapter
            else:
                listed = deque(adapter for adapter in spec.fleet.adapters if adapter.name in search.trials)
                self.sources[department] = lambda listed=listed: listed.popleft() if listed else None
        spec.fleet.adapters = []  # every trial joins as it is handed over (the trainer adds it here)
        self.turns = deque(spec.departments)  # departments with trials left, the next one's turn first

    def next_adapter(self) -> AdapterSpec | None:
        """The trial of the next department in turn that has one left; None when none has."""
        while self.turns:
            department = self.turns.popleft()
            adapter = self.sources[department]()
            if adapter is not None:
                self.turns.append(department)
                return adapter
        return None
