"""Asynchronous successive halving (ASHA, Li et al. 2020), decided as trials reach each rung.

A trial reaching a rung is compared with every trial that reached that rung before it (and those
reaching it in the same fleet step, in the order the fleet runs them): it continues when its metric
is among the best 1/reduction_factor of them, else it stops. The first trials at a rung continue
only while they are the best so far, so a trial never waits for others to catch up. This is
Optuna's SuccessiveHalvingPruner rule, decided on the held-out numbers the fleet already computes
(lower is better). A trial whose metric is not finite always stops.
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
    def __init__(self, rungs: Rungs) -> None:
        self.rungs = rungs
        self.rung_steps = set(rungs.steps())
        self.reached: dict[int, list[float]] = {}  # rung step -> the metric of each trial that reached it
        self.decisions: list[RungDecision] = []

    def stops(self, trial: str, step: int, value: float) -> bool:
        """Whether `trial`, at optimizer step `step` with metric `value`, stops here (False off the rungs)."""
        if step not in self.rung_steps:
            return False
        value = value if math.isfinite(value) else math.inf
        reached = self.reached.setdefault(step, [])
        reached.append(value)
        kept = max(len(reached) // self.rungs.reduction_factor, 1)
        continues = math.isfinite(value) and value <= sorted(reached)[kept - 1]
        self.decisions.append(RungDecision(trial, step, value, continues, len(reached)))
        return not continues
