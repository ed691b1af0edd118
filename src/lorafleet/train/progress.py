"""What a training run reports as it goes: a line of metrics per optimizer step, a progress bar
per adapter (or another display the run is given, such as a sweep's), and the result it returns.

The line (`step_record`) is what metrics.jsonl, TensorBoard (train/run_log.py), the report and an
adapter's lineage read: loss, pre-clip gradient norm, learning rate, tokens, epoch, elapsed time,
a preference objective's terms and statistics, and the held-out numbers of the steps evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from lorafleet.train.job import AdapterJob


@dataclass
class FleetResult:
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> PEFT directory
    losses: dict[str, list[float]] = field(default_factory=dict)  # per optimizer step
    skipped: dict[str, list[str]] = field(default_factory=dict)  # bad records skipped, per adapter
    diverged: list[str] = field(default_factory=list)  # stopped unsaved: the loss was no longer a number
    fleet_steps: int = 0
    tokens: int = 0  # non-padding tokens of all adapters processed so far


def step_record(job: AdapterJob, loss: float, fleet_step: int, elapsed: float) -> dict:
    """The metrics line of the optimizer step `job` just took (mean `loss` over its micro-batches)."""
    record = {
        "adapter": job.name,
        "step": job.optimizer_step,
        "fleet_step": fleet_step,
        "loss": loss,
        "grad_norm": job.last_grad_norm,  # before clipping
        "lr": job.last_learning_rate,
        "tokens": job.tokens,
        "epoch": round(job.stream.epoch, 4),
        "elapsed_s": round(elapsed, 3),
    }
    return record | dict(zip(job.objective.metric_names, job.take_statistics(), strict=True))


class ProgressDisplay(Protocol):
    """What the trainer tells a display: an adapter started or resumed, took an optimizer step
    (its metrics line, seconds since the start), stopped because its loss was no longer a number,
    and the run ended."""

    def start(self, job: AdapterJob) -> None: ...
    def resumed(self, job: AdapterJob) -> None: ...
    def stepped(self, job: AdapterJob, record: dict, elapsed: float) -> None: ...
    def stopped(self, job: AdapterJob) -> None: ...
    def close(self) -> None: ...


class ProgressBars:
    """One tqdm bar per adapter, counting its optimizer steps (shown by process 0 alone)."""

    def __init__(self, shown: bool) -> None:
        self.shown = shown
        self.bars: dict[str, tqdm] = {}

    def start(self, job: AdapterJob) -> None:
        self.bars[job.name] = tqdm(
            total=job.total_steps,
            desc=job.name,
            position=len(self.bars),
            leave=True,
            disable=not self.shown,
            dynamic_ncols=True,
        )

    def resumed(self, job: AdapterJob) -> None:
        self.bars[job.name].update(job.optimizer_step)

    def stepped(self, job: AdapterJob, record: dict, elapsed: float) -> None:
        shown = {"loss": f"{record['loss']:.4f}", "tok_s": f"{job.tokens / max(elapsed, 1e-9):.0f}"}
        if "reward_accuracy" in record:
            shown["acc"] = f"{record['reward_accuracy']:.2f}"
        if "eval_loss" in record:
            shown["eval_loss"] = f"{record['eval_loss']:.4f}"
        bar = self.bars[job.name]
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    def stopped(self, job: AdapterJob) -> None:
        self.bars[job.name].set_postfix({"stopped": "loss not a number"}, refresh=False)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
