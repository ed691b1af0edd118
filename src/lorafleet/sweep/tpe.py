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

A resumed sweep continues the very draws: each trainer checkpoint keeps the drawing as it stood at
its fleet step (`DrawnTrials.saved`), pickled: every study whole (its in-memory storage and its
sampler with the sampler's random state, and the trials asked but not yet told), whose turn is
next and which listed trials are still to hand over. Telling a fresh study the numbers again would
not do: TPE's random state would differ, and so would every trial drawn after the resume.

A choice dimension is a categorical over the positions of its values: a choice may list lists
(target modules), which Optuna's categoricals do not hold. optuna is an optional extra
(`pip install 'lorafleet[sweep]'`), imported only when a TPE sweep starts.
"""

from __future__ import annotations

import math
import pickle
from collections import deque
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

    def saved(self) -> dict:
        """What a checkpoint keeps of the department's study (pickled with every other study by
        `DrawnTrials.saved`, so that each asked trial still points at its study)."""
        kept = ("study", "running", "told", "informed_by")
        return {key: getattr(self, key) for key in kept} | {"trials": dict(self.spec.trials)}

    def restore(self, saved: dict) -> None:
        """Continue as the study stood when `saved` was taken: asked, told and drawn alike."""
        self.study, self.running = saved["study"], saved["running"]
        self.told, self.informed_by = saved["told"], saved["informed_by"]
        self.spec.trials.update(saved["trials"])

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
        self.spec, self.studies = spec, studies
        self.listed = {
            department: deque(adapter for adapter in spec.fleet.adapters if adapter.name in search.trials)
            for department, search in spec.departments.items()
            if department not in studies
        }
        spec.fleet.adapters = []  # every trial joins as it is handed over (the trainer adds it here)
        self.turns = deque(spec.departments)  # departments with trials left, the next one's turn first

    def next_adapter(self) -> AdapterSpec | None:
        """The trial of the next department in turn that has one left; None when none has."""
        while self.turns:
            department = self.turns.popleft()
            adapter = self._draw(department)
            if adapter is not None:
                self.turns.append(department)
                return adapter
        return None

    @property
    def exhausted(self) -> bool:
        """Every trial is handed over: the trainer asks no more."""
        return not self.turns

    def saved(self) -> bytes:
        """The drawing as it stands, pickled for a checkpoint: whose turn is next, the listed trials
        still to hand over, and every study (storage, sampler and its random state, asked trials)."""
        return pickle.dumps(
            {
                "turns": list(self.turns),
                "listed": {department: [a.name for a in listed] for department, listed in self.listed.items()},
                "studies": {department: study.saved() for department, study in self.studies.items()},
            }
        )

    def restore(self, saved: bytes, handed: list[str]) -> None:
        """Continue the drawing from `saved`, the trials `handed` over by then (in the order they
        were) back in the fleet's adapters, as the checkpoint holds them."""
        state = pickle.loads(saved)
        for department, study in self.studies.items():
            study.restore(state["studies"][department])
        by_name = {adapter.name: adapter for queue in self.listed.values() for adapter in queue}
        self.listed = {
            department: deque(by_name[name] for name in names) for department, names in state["listed"].items()
        }
        self.turns = deque(state["turns"])
        self.spec.fleet.adapters = [by_name.get(name) or self._drawn_trial(name) for name in handed]

    def _draw(self, department: str) -> AdapterSpec | None:
        if department in self.studies:
            return self.studies[department].next_adapter()
        listed = self.listed[department]
        return listed.popleft() if listed else None

    def _drawn_trial(self, name: str) -> AdapterSpec:
        """The adapter spec of a trial a study drew, from the values it drew."""
        search = next(self.spec.departments[d] for d in self.studies if name in self.spec.departments[d].trials)
        return search.new_trial(name, search.trials[name])
