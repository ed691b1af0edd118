"""Asynchronous successive halving (ASHA, Li et al. 2020), decided as trials reach each rung.

A trial reaching a rung is ranked among every trial that has reached that rung so far, itself and
those reaching it in the same fleet step included: it continues when its metric is among the best
1/reduction_factor of them (the best one at least), else it stops. Trials arriving together are
ranked together; a trial never waits for later ones to catch up, so the first at a rung compete
only with each other. This is the rule of Optuna's SuccessiveHalvingPruner, decided on the
held-out numbers the fleet already computes (lower is better, or higher for a metric such as a
reward accuracy: `higher_is_better`). A non-finite metric always stops.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lorafleet.sweep.space import Rungs


@dataclass(frozen=True)
class RungDecision:
    trial: str
    step: int  # the rung: optimizer steps the trial had taken
    value: float  # its metric there
    continues: bool
    competitors: int  # trials at this rung so far, itself included

    def to_dict(self) -> dict:
        return asdict(self)


class SuccessiveHalving:
    def __init__(self, rungs: Rungs, higher_is_better: bool = False) -> None:
        self.rungs = rungs
        self.sign = -1.0 if higher_is_better else 1.0  # ranked on sign x metric, lowest first
        self.rung_steps = set(rungs.steps())
        self.reached: dict[int, list[float]] = {}  # rung step -> the metric of each trial that reached it
        self.decisions: list[RungDecision] = []

    def stopping(self, arrivals: list[tuple[str, int, float]]) -> set[str]:
        """The trials that stop among `arrivals` ((trial, optimizer step, metric): the held-out
        numbers of one fleet step, in the order the trials run); trials off the rungs continue."""
        at_rungs = [(trial, step, _finite(value)) for trial, step, value in arrivals if step in self.rung_steps]
        for _, step, value in at_rungs:
            self.reached.setdefault(step, []).append(self._ranked(value))
        stopped = set()
        for trial, step, value in at_rungs:
            reached = sorted(self.reached[step])
            kept = max(len(reached) // self.rungs.reduction_factor, 1)
            continues = math.isfinite(value) and self._ranked(value) <= reached[kept - 1]
            self.decisions.append(RungDecision(trial, step, value, continues, len(reached)))
            if not continues:
                stopped.add(trial)
        return stopped

    def _ranked(self, value: float) -> float:
        """What the rungs sort (lowest best); a non-finite metric ranks last either way."""
        return self.sign * value if math.isfinite(value) else math.inf


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf
