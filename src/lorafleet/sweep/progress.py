"""What a sweep shows while it runs: one bar over its trials, with how many run, wait, stopped at a
rung and finished their budget, and the best held-out number so far.

A sweep of sixteen trials would draw sixteen of the trainer's per-adapter bars; this display takes
their place (the trainer's `display`), counting a trial as decided when it stops or finishes.
`sweep_status` is the text itself, a pure function of the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from lorafleet.train.job import AdapterJob


@dataclass(frozen=True)
class Best:
    value: float
    trial: str
    step: int


def sweep_status(running: int, queued: int, stopped: int, finished: int, metric: str, best: Best | None) -> str:
    counts = f"{running} running, {queued} queued, {stopped} stopped, {finished} finished"
    if best is None:
        return f"{counts}; no {metric} yet"
    return f"{counts}; best {metric} {best.value:.4f} ({best.trial}, step {best.step})"


class SweepProgress:
    """The trainer's display for a sweep of `trials` compared on `metric` (shown or quiet)."""

    def __init__(self, trials: int, metric: str, shown: bool) -> None:
        self.trials, self.metric = trials, metric
        self.running: set[str] = set()
        self.stopped = self.finished = 0
        self.best: Best | None = None
        self.bar = tqdm(total=trials, desc="sweep", unit="trial", disable=not shown, dynamic_ncols=True)

    def status(self) -> str:
        queued = self.trials - len(self.running) - self.stopped - self.finished
        return sweep_status(len(self.running), queued, self.stopped, self.finished, self.metric, self.best)

    def start(self, job: AdapterJob) -> None:
        self.running.add(job.name)
        self.bar.set_postfix_str(self.status())

    def resumed(self, job: AdapterJob) -> None:
        pass  # started already: `start` counted it

    def stepped(self, job: AdapterJob, record: dict, elapsed: float) -> None:
        value = record.get(self.metric)
        if value is not None and (self.best is None or value < self.best.value):
            self.best = Best(value, job.name, record["step"])
        if record.get("stopped") or job.done:
            self.running.discard(job.name)
            if record.get("stopped"):
                self.stopped += 1
            else:
                self.finished += 1
            self.bar.update(1)
        self.bar.set_postfix_str(self.status(), refresh=False)

    def close(self) -> None:
        self.bar.set_postfix_str(self.status())
        self.bar.close()
