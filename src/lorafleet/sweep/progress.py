"""What a sweep shows while it runs: one bar over its trials, with how many run, wait, stopped at a
rung and finished their budget, and each department's best held-out number so far.

A sweep of sixteen trials would draw sixteen of the trainer's per-adapter bars; this display takes
their place (the trainer's `display`), counting a trial as decided when it stops or finishes. The
counts are over every department's trials (they share the fleet's slots); the best is each
department's own, since its trials are compared only among themselves. `sweep_status` is the text
itself, a pure function of the counts and the bests.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from lorafleet.sweep.space import DepartmentSearch
from lorafleet.train.job import AdapterJob


@dataclass(frozen=True)
class Best:
    value: float
    trial: str
    step: int


def sweep_status(
    running: int, queued: int, stopped: int, finished: int, bests: dict[str, tuple[str, Best | None]]
) -> str:
    """`bests`: department -> (its metric, its best so far); a department is named when there are several."""
    counts = f"{running} running, {queued} queued, {stopped} stopped, {finished} finished"
    named = len(bests) > 1
    shown = [_best_text(department if named else "", metric, best) for department, (metric, best) in bests.items()]
    return "; ".join([counts, *shown])


def _best_text(department: str, metric: str, best: Best | None) -> str:
    prefix = f"{department}: " if department else ""
    if best is None:
        return f"{prefix}no {metric} yet"
    return f"{prefix}best {metric} {best.value:.4f} ({best.trial}, step {best.step})"


def _trials_to_run(search: DepartmentSearch) -> int:
    """Every trial of the department's, those a TPE study has still to draw included."""
    return search.trial_count if search.sampler == "tpe" else len(search.trials)


class SweepProgress:
    """The trainer's display for a sweep of `departments` (shown or quiet)."""

    def __init__(self, departments: dict[str, DepartmentSearch], shown: bool) -> None:
        self.departments = departments  # a TPE department's trials join its `trials` as they are drawn
        self.metric = {name: search.metric for name, search in departments.items()}
        self.trials = sum(_trials_to_run(search) for search in departments.values())
        self.running: set[str] = set()
        self.stopped_trials = self.finished_trials = 0  # at a rung (or diverged); their whole budget
        self.best: dict[str, Best | None] = dict.fromkeys(departments)
        self.bar = tqdm(total=self.trials, desc="sweep", unit="trial", disable=not shown, dynamic_ncols=True)

    def status(self) -> str:
        queued = self.trials - len(self.running) - self.stopped_trials - self.finished_trials
        bests = {department: (self.metric[department], best) for department, best in self.best.items()}
        return sweep_status(len(self.running), queued, self.stopped_trials, self.finished_trials, bests)

    def start(self, job: AdapterJob) -> None:
        self.running.add(job.name)
        self.bar.set_postfix_str(self.status())

    def resumed(self, job: AdapterJob) -> None:
        pass  # started already: `start` counted it

    def stepped(self, job: AdapterJob, record: dict, elapsed: float) -> None:
        department = next(name for name, search in self.departments.items() if job.name in search.trials)
        value, best = record.get(self.metric[department]), self.best[department]
        if value is not None and (best is None or self._better(department, value, best.value)):
            self.best[department] = Best(value, job.name, record["step"])
        if record.get("stopped") or job.done:
            self.running.discard(job.name)
            if record.get("stopped"):
                self.stopped_trials += 1
            else:
                self.finished_trials += 1
            self.bar.update(1)
        self.bar.set_postfix_str(self.status(), refresh=False)

    def _better(self, department: str, value: float, best: float) -> bool:
        return value > best if self.departments[department].higher_is_better else value < best

    def stopped(self, job: AdapterJob) -> None:
        """`job` diverged (its loss was no longer a number): stopped, though at no rung."""
        self.running.discard(job.name)
        self.stopped_trials += 1
        self.bar.update(1)
        self.bar.set_postfix_str(self.status(), refresh=False)

    def close(self) -> None:
        self.bar.set_postfix_str(self.status())
        self.bar.close()
