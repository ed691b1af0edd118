"""How the fleet runs on its processes: one object per parallel mode.

`SingleProcess` is the fleet as the trainer's loop reads it: one process trains every adapter on
every example and writes the fleet's files. Under torchrun (train/distributed.py, docs/distributed.md)
the other two change only what differs:

- `DataParallel`: every process trains every adapter on its share of each micro-batch (examples
  r::world), scaled so that the processes' losses and gradients sum to the single process's; one
  all-reduce per step sums them. Process 0 evaluates (unless the base is sharded), saves and writes.
- `AdapterParallel`: each process trains its share of the adapters, alone. The processes meet at
  checkpoint steps and at the end: process 0 gathers what each sends (`Mail`), writes it and the
  checkpoint, and places the adapters still queued afresh.

Either way a checkpoint is the single-process checkpoint, so a run stopped on N processes resumes
on any number, one included.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.governance.audit import utc_now
from lorafleet.train import checkpoint, distributed
from lorafleet.train.admission import Admission
from lorafleet.train.distributed import Group
from lorafleet.train.job import AdapterJob
from lorafleet.train.progress import FleetResult
from lorafleet.train.provenance import TrainingProvenance
from lorafleet.train.references import ReferenceCache
from lorafleet.train.run_log import RunLog


class FleetRun(Protocol):
    """What a parallel mode reads and changes of the trainer running it."""

    spec: FleetSpec
    fleet_step: int
    active: list[AdapterJob]
    pending: deque[AdapterSpec]
    result: FleetResult
    admission: Admission
    references: ReferenceCache
    run_log: RunLog
    provenance: TrainingProvenance | None

    def checkpoint_state(self) -> dict: ...

    def save_checkpoint(self, state: dict) -> None: ...


class SingleProcess:
    """One process: every adapter, every example; it writes the fleet's files itself."""

    rank, world = 0, 1
    shards_base = False
    mail: Mail | None = None  # adapter-parallel: what this process sends process 0 when they meet

    def on_this_process(self, spec: FleetSpec) -> FleetSpec:
        """The fleet as this process runs it (on its own device), refused when the mode cannot run it."""
        return spec

    @property
    def references_together(self) -> Group | None:
        """The processes that compute each step's pair references together (each then holds all)."""
        return None

    @property
    def evaluates(self) -> bool:
        """Whether this process runs held-out evaluation."""
        return True

    @property
    def evaluates_together(self) -> Group | None:
        """The processes that evaluate every held-out pair together (each forward needs all of them)."""
        return None

    @property
    def saves_adapters(self) -> bool:
        return True

    def trains(self, name: str) -> bool:
        return True

    def place(self, work: dict[str, float], pending: deque[AdapterSpec]) -> deque[AdapterSpec]:
        """The queued adapters this process trains, of those with `work` still to do."""
        return pending

    def split(self, jobs: list[AdapterJob], drawn: list[list]) -> tuple[list[list], list | None]:
        """This process's examples (or pairs) of each micro-batch, and its share of each mean."""
        return drawn, None

    def reduce(
        self, losses: list[torch.Tensor], statistics: dict[int, torch.Tensor], due: list[AdapterJob], dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """The step's whole losses and statistics, and the whole gradients of the adapters `due` to step."""
        return losses, statistics

    def resumed(self, job: AdapterJob) -> None:
        """`job` has just been restored from a checkpoint."""

    def checkpoint(self, run: FleetRun) -> None:
        run.save_checkpoint(run.checkpoint_state())

    def all_trained(self, run: FleetRun) -> bool:
        """This process's adapters are trained: is the whole fleet?"""
        return True

    def finish(self, result: FleetResult, spec: FleetSpec) -> None:
        """Complete the run's result (on process 0) with what only the other processes know."""


class DataParallel(SingleProcess):
    """Every adapter on every process, each micro-batch split between them."""

    def __init__(self, group: Group) -> None:
        self.group, self.rank, self.world = group, group.rank, group.world
        self.shards_base = group.shards_base

    def on_this_process(self, spec: FleetSpec) -> FleetSpec:
        too_small = [a.name for a in spec.adapters if a.micro_batch_size < self.world]
        if too_small:
            raise ConfigError(
                f"parallel mode data splits each micro-batch's examples across the {self.world} processes: "
                f"give {', '.join(too_small)} a micro_batch_size of at least {self.world} (and grad_accum "
                "divided as much), or use parallel: {mode: adapter}"
            )
        return _on_device(spec, self.group)

    @property
    def references_together(self) -> Group | None:
        return self.group

    @property
    def evaluates(self) -> bool:
        return self.rank == 0 or self.shards_base  # the weights are the same everywhere; a sharded base needs all

    @property
    def evaluates_together(self) -> Group | None:
        return self.group if self.shards_base else None

    @property
    def saves_adapters(self) -> bool:
        return self.rank == 0  # the copies are all the same

    def split(self, jobs: list[AdapterJob], drawn: list[list]) -> tuple[list[list], list | None]:
        """Examples r::world; scaled by its objective's share (of the label tokens, or of the pairs and
        their chosen answers' tokens), the processes' losses and gradients sum to the single process's."""
        mine = [group[self.rank :: self.world] for group in drawn]
        shares = [job.objective.share(local, group) for job, local, group in zip(jobs, mine, drawn, strict=True)]
        return mine, shares

    def reduce(
        self, losses: list[torch.Tensor], statistics: dict[int, torch.Tensor], due: list[AdapterJob], dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """One all-reduce sums the step's losses and preference statistics (each process holds its
        part) and the accumulated gradients of the adapters about to step."""
        params = [param for job in due for param in job.params]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        numbers = [
            torch.stack([loss.detach() for loss in losses]).to(dtype),
            *(v.to(dtype) for v in statistics.values()),
        ]
        flat = self.group.all_reduce(torch.cat([*numbers, *(p.grad.flatten() for p in params)]))
        sizes = [len(losses), *(len(values) for values in statistics.values())]
        offset = sum(sizes)
        for param in params:
            param.grad.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()
        summed = flat[: sum(sizes)].split(sizes)
        return list(summed[0].unbind()), dict(zip(statistics, summed[1:], strict=True))

    def resumed(self, job: AdapterJob) -> None:
        if self.rank != 0:
            job.optimizer.zero_grad([job.name])  # process 0 holds the sum accumulated so far

    def checkpoint(self, run: FleetRun) -> None:
        state = run.checkpoint_state()
        self._sum_accumulated_gradients(run.active, state)
        if self.rank == 0:
            run.save_checkpoint(state)

    def _sum_accumulated_gradients(self, active: list[AdapterJob], state: dict) -> None:
        """Each process holds its part of the gradients accumulated so far in an unfinished optimizer
        step; the checkpoint holds their sum (process 0 resumes with it)."""
        jobs = [job for job in active if job.micro_step % job.spec.grad_accum]
        params = [param for job in jobs for param in job.params]
        if not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = self.group.all_reduce(torch.cat([grad.flatten() for grad in grads]))
        sums = iter(flat.cpu().split([p.numel() for p in params]))
        for job in jobs:
            state["active"][job.name]["grads"] = [next(sums).view_as(p).clone() for p in job.params]


@dataclass
class SavedJob:
    """What the provenance of a saved adapter reads from its job, sent by the process that trained it."""

    spec: AdapterSpec
    optimizer_step: int
    tokens: int

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Mail:
    """What an adapter-parallel process sends process 0 at the next meeting: the metrics lines and
    the saved adapters it would have written itself."""

    records: list[dict] = field(default_factory=list)
    saved: list[dict] = field(default_factory=list)
    started: dict[str, str] = field(default_factory=dict)  # when each of its adapters started

    def note_started(self, name: str) -> None:
        self.started[name] = utc_now()

    def note_saved(self, job: AdapterJob, directory: Path, fleet_step: int, step_losses: list[float]) -> None:
        facts = {"name": job.name, "directory": str(directory), "fleet_step": fleet_step}
        facts |= {"losses": list(step_losses), "optimizer_step": job.optimizer_step, "tokens": job.tokens}
        self.saved.append(facts | {"started": self.started.get(job.name)})

    def take(self) -> tuple[list[dict], list[dict]]:
        """The records and saved adapters since the last meeting."""
        records, saved = self.records, self.saved
        self.records, self.saved = [], []
        return records, saved


class AdapterParallel(SingleProcess):
    """Each process trains its share of the adapters; they meet at checkpoint steps and at the end."""

    def __init__(self, group: Group) -> None:
        self.group, self.rank, self.world = group, group.rank, group.world
        self.mail = Mail()
        self.share: set[str] | None = None  # the adapters this process trains
        self.fleet_totals: tuple[int, int] = (0, 0)  # process 0: every process's tokens, the last fleet step

    def on_this_process(self, spec: FleetSpec) -> FleetSpec:
        return _on_device(spec, self.group)

    def trains(self, name: str) -> bool:
        return self.share is None or name in self.share

    def place(self, work: dict[str, float], pending: deque[AdapterSpec]) -> deque[AdapterSpec]:
        """Greedy longest-processing-time over the processes (train/distributed.py's `place`)."""
        self.share = set(distributed.place(work, self.world)[self.rank])
        return deque(a for a in pending if a.name in self.share)

    def checkpoint(self, run: FleetRun) -> None:
        self.meet(run, done=False)

    def all_trained(self, run: FleetRun) -> bool:
        # this share is trained; wait for the others' next checkpoint step (which may hand this
        # process queued adapters of theirs) or their end
        return self.meet(run, done=True)

    def finish(self, result: FleetResult, spec: FleetSpec) -> None:
        if self.rank == 0:  # the whole fleet's, gathered at the end
            result.tokens, result.fleet_steps = self.fleet_totals
            saved = result.adapters
            result.adapters = {a.name: saved[a.name] for a in spec.adapters if a.name in saved}

    def meet(self, run: FleetRun, done: bool) -> bool:
        """A meeting at a checkpoint step (or at the end, `done`): process 0 gathers every process's
        mail, losses and training state, writes them and the checkpoint, and places the adapters
        still queued anywhere afresh, against the work each process has left (a process that is done
        takes some); True when every process is done."""
        mine = self.share or set()
        left = sum(run.admission.work(job.spec) * (1 - job.optimizer_step / job.total_steps) for job in run.active)
        records, saved = self.mail.take()
        payload = {
            "done": done,
            "fleet_step": run.fleet_step,
            "queued": [spec.name for spec in run.pending],
            "left": left,
            "tokens": run.result.tokens,
            "records": records,
            "saved": saved,
            "losses": {name: losses for name, losses in run.result.losses.items() if name in mine},
            "active": {} if done else {job.name: job.state_dict() for job in run.active},
            "reference_logps": run.references.saved(mine),
        }
        gathered = self.group.gather(payload)
        decision = None
        if self.rank == 0:
            self._merge(run, gathered)
            by_name = {spec.name: spec for spec in run.spec.adapters}
            queued = {name: run.admission.work(by_name[name]) for item in gathered for name in item["queued"]}
            decision = {
                "finished": all(item["done"] for item in gathered),
                "fleet_step": max(item["fleet_step"] for item in gathered),
                "queued": distributed.place(queued, self.world, [item["left"] for item in gathered]),
            }
        decision = self.group.broadcast(decision)
        run.fleet_step = decision["fleet_step"]  # one count of fleet steps, whoever waited
        queued = set(decision["queued"][self.rank])
        self.share = (mine - {spec.name for spec in run.pending}) | queued
        run.pending = deque(spec for spec in run.spec.adapters if spec.name in queued)
        return decision["finished"]

    def _merge(self, run: FleetRun, gathered: list[dict]) -> None:
        """Process 0: what every process sent, into the fleet's files."""
        order = {a.name: index for index, a in enumerate(run.spec.adapters)}
        records = [record for item in gathered for record in item["records"]]
        for record in sorted(records, key=lambda record: (record["fleet_step"], order[record["adapter"]])):
            run.run_log.write(record)
        by_name = {a.name: a for a in run.spec.adapters}
        for item in gathered:
            run.result.losses.update(item["losses"])
            for saved in item["saved"]:
                name = saved["name"]
                run.result.adapters[name] = Path(saved["directory"])
                run.provenance.started[name] = saved["started"]
                job = SavedJob(by_name[name], saved["optimizer_step"], saved["tokens"])
                run.provenance.adapter_saved(job, Path(saved["directory"]), saved["fleet_step"], saved["losses"])
        self.fleet_totals = (sum(item["tokens"] for item in gathered), max(item["fleet_step"] for item in gathered))
        running = [item for item in gathered if not item["done"]]
        if not running:
            return
        active = {name: state for item in running for name, state in item["active"].items()}
        references = {name: known for item in running for name, known in item["reference_logps"].items()}
        active = dict(sorted(active.items(), key=lambda item: order[item[0]]))
        state = checkpoint.fleet_state(
            running[0]["fleet_step"], run.spec, list(run.result.adapters), run.result.losses, active, references
        )
        run.save_checkpoint(state)


ParallelMode = SingleProcess | DataParallel | AdapterParallel


def parallel_mode(group: Group | None) -> ParallelMode:
    """The mode of a run: one process (no group), or the group's mode under torchrun."""
    if group is None:
        return SingleProcess()
    return DataParallel(group) if group.data_parallel else AdapterParallel(group)


def _on_device(spec: FleetSpec, group: Group) -> FleetSpec:
    return dataclasses.replace(spec, device=str(group.device))
