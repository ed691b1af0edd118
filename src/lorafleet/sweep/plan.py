"""`lorafleet sweep --plan`: a sweep's memory and time, predicted before anything trains.

Memory is `lorafleet plan`'s prediction (train/plan.py, the trainer's own admission) for the
sweep's trial fleet, every department's trials in it. Which trials run together depends on the
rung decisions, so the peak assumes the worst: the `max_concurrent` trials the memory model finds
heaviest (the largest ranks), of whichever departments, running at once.

Time is counted in optimizer steps and tokens, which the sweep file fixes, per department and in
all: every trial's whole budget (the worst case: no trial stopped), and what successive halving
spends if each rung keeps exactly 1/reduction_factor of the department's trials that reach it (the
expected case; ASHA decides as trials arrive, so early arrivals can pass a rung with fewer rivals
and a real sweep may spend somewhat more). Seconds need a measured rate, the fleet's tokens/s on
this machine: given (`--tokens-per-s`) or read from the metrics.jsonl of an earlier run
(`--rate-from`), never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.sweep.space import DepartmentSearch, Rungs, SweepSpec
from lorafleet.train import memory
from lorafleet.train.admission import Admission
from lorafleet.train.plan import planning_admission, training_dtype


@dataclass
class DepartmentSpend:
    """What one department's trials spend."""

    department: str
    trials: int
    steps_worst: int  # optimizer steps if no trial stops
    steps_expected: int  # if every rung keeps exactly 1/reduction_factor
    tokens_per_step: float  # mean over its trials: tokens one optimizer step of a trial computes

    @property
    def tokens_worst(self) -> float:
        return self.steps_worst * self.tokens_per_step

    @property
    def tokens_expected(self) -> float:
        return self.steps_expected * self.tokens_per_step


@dataclass
class SweepPlan:
    dtype: str
    peak_trials: list[str]  # the trials the peak assumes run at once: the heaviest max_concurrent
    peak: memory.MemoryEstimate
    budget: int | None  # bytes
    departments: list[DepartmentSpend]  # in the sweep file's order
    tokens_per_s: float | None = None  # the measured fleet rate the seconds rest on
    rate_source: str | None = None  # where that rate comes from

    @property
    def trials(self) -> int:
        return sum(d.trials for d in self.departments)

    @property
    def steps_worst(self) -> int:
        return sum(d.steps_worst for d in self.departments)

    @property
    def steps_expected(self) -> int:
        return sum(d.steps_expected for d in self.departments)

    @property
    def tokens_worst(self) -> float:
        return sum(d.tokens_worst for d in self.departments)

    @property
    def tokens_expected(self) -> float:
        return sum(d.tokens_expected for d in self.departments)


def halving_steps(trials: int, rungs: Rungs) -> int:
    """Optimizer steps successive halving spends when each rung keeps exactly the best
    1/reduction_factor of the trials reaching it (at least one), the rest stopping there."""
    steps, reached, trained = 0, trials, 0
    for rung in [*rungs.steps(), rungs.budget]:
        steps += reached * (rung - trained)
        reached, trained = max(reached // rungs.reduction_factor, 1), rung
    return steps


def plan_sweep(
    spec: SweepSpec,
    budget_gb: float | None = None,
    dtype: torch.dtype | None = None,
    tokens_per_s: float | None = None,
    rate_from: Path | None = None,
) -> SweepPlan:
    refuse_drawn_trials(spec)
    fleet = spec.fleet
    dtype = dtype or training_dtype(fleet)
    admission = planning_admission(fleet, budget_gb, dtype)
    alone = {a.name: admission.predicted_memory([a]).total for a in fleet.adapters}
    heaviest = sorted(fleet.adapters, key=lambda a: alone[a.name], reverse=True)[: fleet.max_concurrent]
    source = None
    if tokens_per_s is not None:
        source = "given (--tokens-per-s)"
    elif rate_from is not None:
        tokens_per_s, source = measured_rate(rate_from)
    return SweepPlan(
        dtype=str(dtype).removeprefix("torch."),
        peak_trials=[a.name for a in heaviest],
        peak=admission.predicted_memory(heaviest),
        budget=admission.budget,
        departments=[department_spend(search, spec, admission) for search in spec.departments.values()],
        tokens_per_s=tokens_per_s,
        rate_source=source,
    )


def refuse_drawn_trials(spec: SweepSpec) -> None:
    """A TPE department's trials are drawn while the sweep runs, so neither their ranks (the peak)
    nor their number in the fleet are known before it starts."""
    for department, search in spec.departments.items():
        if search.sampler == "tpe":
            raise ConfigError(
                f"--plan: department {department!r} draws its trials with sampler: tpe while the sweep runs, "
                "so the plan cannot know them; plan the same space with sampler: random (the same trials "
                "count; the peak assumes its heaviest draws)"
            )


def department_spend(search: DepartmentSearch, spec: SweepSpec, admission: Admission) -> DepartmentSpend:
    trials = [a for a in spec.fleet.adapters if a.name in search.trials]
    work = [admission.work(a) for a in trials]  # tokens of a trial's whole budget
    return DepartmentSpend(
        department=search.department,
        trials=len(trials),
        steps_worst=len(trials) * search.rungs.budget,
        steps_expected=halving_steps(len(trials), search.rungs),
        tokens_per_step=sum(work) / len(work) / search.rungs.budget,
    )


def measured_rate(run_dir: Path) -> tuple[float, str]:
    """The fleet's tokens/s over a finished run: every adapter's last token count over the seconds
    of the run's last line (the rate its report draws, averaged over the whole run)."""
    metrics = FleetDir(run_dir).metrics
    if not metrics.exists():
        raise ConfigError(f"--rate-from {run_dir}: no {metrics.name} there; give the output of a run on this machine")
    tokens, seconds = {}, 0.0
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "tokens" in record and "elapsed_s" in record:
            tokens[record["adapter"]] = record["tokens"]
            seconds = record["elapsed_s"]
    if not tokens or seconds <= 0:
        raise ConfigError(f"--rate-from {run_dir}: {metrics} records no optimizer step with its time")
    rate = sum(tokens.values()) / seconds
    return rate, f"measured: {sum(tokens.values()):,} tokens in {seconds:.1f} s in {metrics}"


def format_sweep_plan(plan: SweepPlan, spec: SweepSpec) -> str:
    gib = memory.GIB
    lines = [
        f"sweep of {', '.join(spec.departments)}: {plan.trials} trials in one fleet, at most "
        f"{spec.fleet.max_concurrent} at once, in {plan.dtype}",
        f"peak memory, the {len(plan.peak_trials)} heaviest trials at once ({', '.join(plan.peak_trials)}): "
        f"{plan.peak.describe()}",
    ]
    if plan.budget is None:
        lines.append("no budget: pass --budget-gb (or set fleet: memory_budget_gb) to check the fit")
    else:
        verdict = "fits" if plan.peak.total <= plan.budget else "does NOT fit (fewer trials will run at once)"
        lines.append(f"budget {plan.budget / gib:.2f} GiB: {verdict}")
    several = len(plan.departments) > 1
    for spend in plan.departments:
        rungs = spec.departments[spend.department].rungs
        lines.append(
            f"{spend.department}: {spend.trials} trials, each {rungs.budget} steps, rungs at {rungs.steps()} "
            f"(reduction factor {rungs.reduction_factor}), {spend.tokens_per_step:,.0f} tokens per trial step "
            "(mean over its trials, from their data)"
        )
        halving = f"each rung keeping 1/{rungs.reduction_factor}"
        lines += _spend_lines(plan, spend, halving, timed=not several)
    if several:
        lines.append(f"all {len(plan.departments)} departments:")
        lines += _spend_lines(plan, plan, "each rung halving as above", timed=True)
    if plan.tokens_per_s is None:
        lines.append(
            "time: needs a measured rate; pass --tokens-per-s (the fleet's, on this machine) or --rate-from "
            "an earlier run's output directory"
        )
    else:
        lines.append(f"at {plan.tokens_per_s:,.1f} tokens/s, {plan.rate_source}")
    return "\n".join(lines)


def _spend_lines(plan: SweepPlan, spend: SweepPlan | DepartmentSpend, halving: str, timed: bool) -> list[str]:
    """The steps and tokens of no trial stopped and of halving, with the seconds at the fleet's rate
    (`timed`: only for the whole sweep, since the rate is the fleet's, all departments together)."""
    lines = []
    for case, steps, tokens in (
        ("no trial stopped", spend.steps_worst, spend.tokens_worst),
        (halving, spend.steps_expected, spend.tokens_expected),
    ):
        time = "" if plan.tokens_per_s is None or not timed else f", {_duration(tokens / plan.tokens_per_s)}"
        lines.append(f"  {case + ':':<28} {steps:>7,} trial steps, {tokens:>14,.0f} tokens{time}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
