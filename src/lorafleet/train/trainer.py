"""The concurrent trainer: many adapters, one forward/backward over the frozen base per step.

One fleet step stacks the next micro-batch of every active adapter into one batch, runs the base
once with each adapter's LoRA update on its own rows, and backpropagates the sum of the adapters'
losses (each divided by its own gradient accumulation). Adapter parameters are disjoint and rows
do not interact, so each adapter receives exactly the gradient it would receive alone; then each
adapter steps its own optimizer when its own accumulation is complete. Finished adapters are saved
and leave the batch; queued ones join while fewer than `max_concurrent` are active.

This module is the loop: build the step, run it, record it, and start and finish adapters. The
rooms beside it do the rest: `step.py` lays the step out, `scoring.py` scores it, each adapter's
objective (`objectives.py`) turns the scores into its loss, `references.py` keeps preference
references, `held_out.py` evaluates, `admission.py` decides who joins, `parallel.py` holds what
differs on several processes, `progress.py` what the run reports, `checkpoint.py` what it keeps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.stream import ExampleStream
from lorafleet.errors import ConfigError, TrainingError
from lorafleet.fleet_dir import FleetDir
from lorafleet.models.attention import training_attention
from lorafleet.models.hf_compat import checkpoint_decoder_layers, compile_decoder_layers
from lorafleet.models.loading import FrozenBase, default_dtype, load_base
from lorafleet.state import restore_rng_state
from lorafleet.train import checkpoint, distributed, memory
from lorafleet.train.admission import Admission, memory_budget, sharded_shape, target_modules
from lorafleet.train.held_out import HeldOut
from lorafleet.train.job import AdapterJob
from lorafleet.train.loss import loss_dtype
from lorafleet.train.objectives import objective_for
from lorafleet.train.optimizer import FleetAdamW, loraplus_scales
from lorafleet.train.parallel import parallel_mode
from lorafleet.train.progress import FleetResult, ProgressBars, ProgressDisplay, step_record
from lorafleet.train.provenance import TrainingProvenance
from lorafleet.train.references import ReferenceCache
from lorafleet.train.run_log import RunLog
from lorafleet.train.scoring import sequence_losses
from lorafleet.train.step import StepInputs, StepLayout


class FleetTrainer:
    def __init__(
        self,
        spec: FleetSpec,
        base: FrozenBase | None = None,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
        group: distributed.Group | None = None,
        stops_early: Callable[[list[tuple[AdapterJob, dict[str, float]]]], set[str]] | None = None,
        stops_diverged: bool = False,
        display: ProgressDisplay | None = None,
        next_adapter: Callable[[], AdapterSpec | None] | None = None,
        checkpoint_extra: Callable[[], bytes] | None = None,
    ) -> None:
        """`stops_early(evaluated)`: given the adapters evaluated on their held-out data in a step,
        each with its numbers, in the order they run (those that have just finished too: stopping
        them changes nothing), the names of those that stop there (a sweep's rung decision); a
        stopped adapter is saved as it stands and its slot goes to the next queued one in the same
        step. `stops_diverged`: an adapter whose loss is no longer a number stops alone, unsaved,
        its slot handed on (a sweep's trial); else the run raises. `display`: what shows the run's
        progress instead of one bar per adapter (a sweep's running, queued and stopped trials).
        `next_adapter()`: asked for one more adapter when none is queued and a slot is free, after
        the step's `stops_early` (a sweep drawing each trial from the rungs decided so far); None
        when there are no more. A drawn adapter joins `spec.adapters`. `checkpoint_extra()`: what
        else each checkpoint keeps, under its `extra` key, asked as it is written (a sweep's drawing
        of its trials as it stood at that fleet step); the checkpoint and it are written as one file."""
        self.parallel = parallel_mode(group)
        if next_adapter is not None and self.parallel.world > 1:
            raise ConfigError("adapters drawn while the fleet trains (a sweep's trials) need one process")
        self._is_rank_zero = self.parallel.rank == 0
        self.spec = spec = self.parallel.on_this_process(spec)
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        attention = spec.attention or ("varlen" if spec.packing else None)
        shards = self.parallel.shards_base
        if shards:
            dtype = dtype or default_dtype(group.device)
        # a sharded base is read on the CPU and moved to the device a shard at a time
        self.base = base or load_base(
            spec.base, "cpu" if shards else spec.device, dtype, quantize=spec.quantize_base, attention=attention
        )
        if shards:
            distributed.shard_base(self.base, group)
        self.fleet = LoRAFleet(self.base.model, self.base.language_prefix)
        # LoRA weights, their gradients and the optimizer state: float32 masters under a bf16 or
        # fp32 base; a float64 base (rounding far below AdamW's eps, for exact comparisons) keeps
        # float64 ones, else every gradient would be rounded to float32 again
        self.master_dtype = loss_dtype(self.base.dtype)
        if spec.activation_checkpointing:
            checkpoint_decoder_layers(self.base.language_model)
        if spec.compile:
            compile_decoder_layers(self.base.language_model)
        self.output = Path(spec.output)
        self.on_step = on_step
        self.stops_early = stops_early
        if stops_diverged and group is not None:
            raise ConfigError("stopping diverged adapters alone runs on one process; start it without torchrun")
        self.stops_diverged = stops_diverged
        self.next_adapter = next_adapter
        self.checkpoint_extra = checkpoint_extra
        self.result = FleetResult()
        # each adapter's objective, target modules, training items and held-out items (_take_in)
        self.objectives, self.targets, self.examples, held_out = {}, {}, {}, {}
        self.loaded: dict[tuple, tuple[list, list[str]]] = {}  # a data file's items, read once for all adapters
        self.run_log = RunLog(self.output, spec.report_to)  # metrics.jsonl: written by process 0 alone
        self.provenance: TrainingProvenance | None = None  # process 0's, from the start of the run
        self.layout = StepLayout(self.base, spec, attention, self.master_dtype)
        self.references = ReferenceCache(self.base, self.fleet, spec, self.master_dtype)
        self.held_out = HeldOut(
            self.base, self.fleet, spec, held_out, self.references,
            self.parallel.evaluates, self.parallel.evaluates_together,
        )  # fmt: skip
        shape = memory.model_shape(self.base.model)
        if shards:
            shape = sharded_shape(shape, group.world)
        budget = memory_budget(spec, self.base)
        self.admission = Admission(spec, self.base, self.examples, self.targets, budget, shape)
        for adapter in spec.adapters:
            self._take_in(adapter)
        self.pending: deque[AdapterSpec] = deque(spec.adapters)
        self.active: list[AdapterJob] = []
        self.optimizer = FleetAdamW()
        self.bars = display or ProgressBars(shown=progress and self._is_rank_zero)
        self.fleet_step = 0
        self.started = time.perf_counter()

    def run(self, resume: bool = False) -> FleetResult:
        self._prepare_output(resume)
        if self._is_rank_zero:
            self.provenance.run_started(self.fleet_step if resume else None)
        try:
            while True:
                self._admit()
                while self.active:
                    self._step()
                if self.parallel.all_trained(self):
                    break
        finally:
            self.run_log.close()
        self.bars.close()
        self.result.fleet_steps = self.fleet_step
        self.parallel.finish(self.result, self.spec)
        if self._is_rank_zero:
            self.provenance.run_finished(self.result.fleet_steps, self.result.tokens, self.result.adapters)
        return self.result

    # --- one fleet step -------------------------------------------------------------------

    def _step(self) -> None:
        step = self._prepare_step()
        self.references.look_up(self.active, step.parts, together=self.parallel.references_together)
        losses, statistics = self._forward_backward(step)
        self.fleet_step += 1
        due = [job for job, count in zip(self.active, step.tokens, strict=True) if job.record_micro_batch(count)]
        losses, statistics = self.parallel.reduce(losses, statistics, due, self.master_dtype)
        read = torch.cat([torch.stack([loss.detach() for loss in losses]), *statistics.values()])
        if due:  # queued behind backward on the device: the host does not wait for either
            rates = {job.name: job.learning_rate for job in due}
            grad_norms = self.optimizer.step(rates)
            self.optimizer.zero_grad(list(rates))
            read = torch.cat([read, grad_norms.to(read.dtype)])
        read = read.tolist()  # the step's one synchronisation: losses, statistics, gradient norms
        values, rest = read[: len(losses)], read[len(losses) :]
        for index, numbers in statistics.items():
            self.active[index].add_statistics(rest[: len(numbers)])
            rest = rest[len(numbers) :]
        for job, grad_norm in zip(due, rest, strict=True):
            job.last_grad_norm = grad_norm
        diverged = []
        for job, value in zip(self.active, values, strict=True):
            if not math.isfinite(value):  # stop before anything of it is saved
                if not self.stops_diverged:
                    raise TrainingError(
                        f"adapter {job.name!r}: the loss became {value} at fleet step {self.fleet_step} "
                        f"(optimizer step {job.optimizer_step + 1}); its weights are not saved. Lower its "
                        f"learning_rate ({job.spec.learning_rate:g}) or keep max_grad_norm on, and train "
                        "again (or --resume from the last checkpoint)"
                    )
                diverged.append((job, value))
                continue
            job.add_loss(value)
        self.result.tokens += sum(step.tokens)
        for job, value in diverged:
            self._drop_diverged(job, value)
        due = [job for job in due if job in self.active]
        if due:
            self._optimizer_stepped(due)
        self._admit()
        if self.spec.checkpoint_every and self.fleet_step % self.spec.checkpoint_every == 0 and self.active:
            self.parallel.checkpoint(self)
        if self.on_step is not None:
            self.on_step(self.fleet_step)

    def _prepare_step(self) -> StepInputs:
        """The next micro-batch of every active adapter (this process's share of it), laid out as
        one batch on the host (train/step.py)."""
        drawn = [job.stream.next_micro_batch() for job in self.active]
        mine, shares = self.parallel.split(self.active, drawn)
        return self.layout.lay_out(self.active, drawn, mine, shares)

    def _forward_backward(self, step: StepInputs) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Forward and backward of one fleet step: device work only (tests/train/test_gpu.py runs
        it with CUDA's synchronisation check set to error). Returns each job's loss, and the
        statistics of the jobs whose objective reports some (by job index)."""
        # Backward runs inside the routing too: recomputed layers (activation checkpointing) and
        # the chunked loss run their forward again there.
        with self.fleet.route(step.batch.routing, by_token=step.batch.packed), training_attention():
            scored = sequence_losses(self.base, step.batch, chunked=self.spec.chunked_loss)
            losses, statistics = self._job_losses(scored, step)
            total = sum(loss / job.spec.grad_accum for loss, job in zip(losses, self.active, strict=True))
            total.backward()
        return losses, statistics

    def _job_losses(
        self, scored: list[torch.Tensor], step: StepInputs
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Each job's loss from the mean losses of its scored segments, by its objective."""
        losses, statistics = [], {}
        for index, (job, part, mine) in enumerate(zip(self.active, step.parts, step.per_part(scored), strict=True)):
            loss, reported = job.objective.loss(mine, part, self.base.dtype)
            losses.append(loss)
            if reported is not None:
                statistics[index] = reported
        return losses, statistics

    def _optimizer_stepped(self, jobs: list[AdapterJob]) -> None:
        """Record the optimizer step just taken by each of `jobs` (and the held-out numbers of those
        due an evaluation); save and retire finished ones."""
        elapsed = time.perf_counter() - self.started
        step_losses = [job.optimizer_stepped() for job in jobs]
        evaluations = self.held_out.measure([job for job in jobs if self.held_out.due(job)])
        stopping = self._stopping(jobs, evaluations)
        for job, loss in zip(jobs, step_losses, strict=True):
            self.result.losses.setdefault(job.name, []).append(loss)
            record = step_record(job, loss, self.fleet_step, elapsed) | evaluations.get(job.name, {})
            stopped = job.name in stopping and not job.done
            if stopped:
                record["stopped"] = True
            if self.parallel.mail is not None:  # adapter-parallel: process 0 writes every process's lines
                self.parallel.mail.records.append(record)
            elif self._is_rank_zero:
                self.run_log.write(record)
            self.bars.stepped(job, record, elapsed)
            if job.done or stopped:
                self._finish(job)

    def _stopping(self, jobs: list[AdapterJob], evaluations: dict[str, dict[str, float]]) -> set[str]:
        """The adapters of `jobs` that stop early after this step's held-out evaluation."""
        evaluated = [(job, evaluations[job.name]) for job in jobs if job.name in evaluations]
        if self.stops_early is None or not evaluated:
            return set()
        return self.stops_early(evaluated)

    # --- starting and finishing adapters ---------------------------------------------------

    def _admit(self) -> None:
        """Start queued adapters while admission lets them (train/admission.py); with none queued
        and a slot free, ask `next_adapter` for one more."""
        while self.pending or self._draw_adapter():
            if not self.admission.admits(self.pending[0], [job.spec for job in self.active]):
                return
            self._start(self.pending.popleft())

    def _draw_adapter(self) -> bool:
        """Queue the adapter `next_adapter` draws, when a slot is free; False if none was drawn."""
        if self.next_adapter is None or len(self.active) >= self.spec.max_concurrent:
            return False
        spec = self.next_adapter()
        if spec is None:
            self.next_adapter = None  # no more: never asked again
            return False
        self.spec.adapters.append(spec)
        self._take_in(spec)
        if self._is_rank_zero:
            self.provenance.describe_data(spec, self.examples[spec.name], self.result.skipped)
        self.pending.append(spec)
        return True

    def _take_in(self, spec: AdapterSpec) -> None:
        """What the step loop and admission need of a new adapter: its objective, targets and items."""
        self.objectives[spec.name] = objective_for(spec)
        if spec.init_from is None:
            self.targets[spec.name] = target_modules(self.base, spec)
        self.examples[spec.name] = self._load(spec)
        if spec.eval_data:
            self.held_out.examples[spec.name] = self._load(spec, spec.eval_data)

    def _start(self, spec: AdapterSpec) -> AdapterJob:
        objective = self.objectives[spec.name]
        if spec.init_from:
            loaded = load_adapter(self.fleet, spec.name, spec.init_from, self.master_dtype)
            if (loaded.use_dora, loaded.use_rslora) != (spec.variant == "dora", spec.use_rslora):
                self.fleet.remove_adapter(spec.name)
                raise ConfigError(
                    f"adapter {spec.name!r}: init_from {spec.init_from} is a "
                    f"{'DoRA' if loaded.use_dora else 'LoRA'} adapter with use_rslora: {loaded.use_rslora}; "
                    f"set variant: {'dora' if loaded.use_dora else 'lora'} and use_rslora: "
                    f"{str(loaded.use_rslora).lower()} to continue it"
                )
            if objective.reference_route is not None:  # reference: init, the same weights, frozen
                load_adapter(self.fleet, objective.reference_route, spec.init_from, self.master_dtype)
                for weight in self.fleet.parameters(objective.reference_route):
                    weight.requires_grad_(False)
        else:
            shape = LoRAShape(
                spec.rank,
                spec.alpha,
                spec.dropout,
                self.targets[spec.name],
                spec.use_rslora,
                spec.variant == "dora",
                spec.init,
            )
            self.fleet.add_adapter(spec.name, shape, seed=spec.seed, dtype=self.master_dtype)
        stream = ExampleStream(self.examples[spec.name], spec.micro_batch_size, spec.seed, spec.shuffle)
        named = dict(self.fleet.named_weights(spec.name))
        scales = loraplus_scales(list(named), [w.shape for w in named.values()], spec.loraplus_lr_ratio)
        job = AdapterJob(spec, objective, stream, list(named.values()), self.optimizer, scales)
        self.active.append(job)
        if self.parallel.mail is not None:
            self.parallel.mail.note_started(spec.name)
        elif self._is_rank_zero:
            self.provenance.adapter_started(spec.name)
        self.bars.start(job)
        return job

    def _finish(self, job: AdapterJob) -> None:
        directory = FleetDir(self.output).adapter(job.name)
        if self.parallel.saves_adapters:
            save_adapter(self.fleet, job.name, directory, self.spec.base, {"max_tiles": self.spec.max_tiles})
        self.result.adapters[job.name] = directory
        step_losses = self.result.losses.get(job.name, [])
        if self.parallel.mail is not None:  # adapter-parallel: process 0 records it when they meet
            self.parallel.mail.note_saved(job, directory, self.fleet_step, step_losses)
        elif self._is_rank_zero:
            self.provenance.adapter_saved(job, directory, self.fleet_step, step_losses)
        self._release(job)

    def _release(self, job: AdapterJob) -> None:
        """Take a finished or stopped `job` out of the step, the optimizer and the fleet."""
        self.active.remove(job)
        self.optimizer.remove(job.name)
        self.fleet.remove_adapter(job.name)
        if job.objective.reference_route is not None:
            self.fleet.remove_adapter(job.objective.reference_route)
        self.references.forget(job.name)

    def _drop_diverged(self, job: AdapterJob, loss: float) -> None:
        """Stop `job`, whose loss is no longer a number, without saving it (its weights are not
        numbers either); its metrics line says why, and the others train on."""
        record = {
            "adapter": job.name,
            "step": job.optimizer_step,  # the optimizer steps it took before the loss broke
            "fleet_step": self.fleet_step,
            "tokens": job.tokens,
            "stopped": True,
            "diverged": True,
            "diverged_loss": str(loss),  # nan or inf: JSON has no number for either
        }
        self.run_log.write(record)
        self.provenance.adapter_diverged(job.name, loss, self.fleet_step, job.optimizer_step)
        self.result.diverged.append(job.name)
        self.bars.stopped(job)
        self._release(job)

    def _load(self, spec: AdapterSpec, path: str | None = None) -> list:
        """The adapter's training items (or those of `path`, its held-out file), as its objective
        reads them; adapters reading one file the same way share its items (a sweep's trials)."""
        path = path or spec.data
        read_as = (spec.objective, spec.skip_bad_records, str(path))  # all the objective's load reads of the spec
        if read_as not in self.loaded:
            self.loaded[read_as] = self.objectives[spec.name].load(path, self.base, self.spec)
        items, skipped = self.loaded[read_as]
        if skipped:
            self.result.skipped.setdefault(spec.name, []).extend(skipped)
        return items

    # --- output, checkpoints and resume ----------------------------------------------------

    def checkpoint_state(self) -> dict:
        active = {job.name: job.state_dict() for job in self.active}
        finished, losses = list(self.result.adapters) + self.result.diverged, self.result.losses
        state = checkpoint.fleet_state(self.fleet_step, self.spec, finished, losses, active, self.references.saved())
        state["diverged"] = list(self.result.diverged)
        if self.checkpoint_extra is not None:
            state["extra"] = self.checkpoint_extra()
        return state

    def save_checkpoint(self, state: dict) -> None:
        path = checkpoint.save_checkpoint(self.output, state, self.spec.keep_checkpoints)
        self.provenance.checkpoint_saved(path, state["fleet_step"], list(state["active"]))

    def _prepare_output(self, resume: bool) -> None:
        if self._is_rank_zero:
            self.provenance = TrainingProvenance(self.spec, self.base, self.examples, self.result.skipped)
        latest = checkpoint.latest_checkpoint(self.output)
        if not resume:
            if latest is not None:
                raise ConfigError(
                    f"{self.output} holds checkpoints of an earlier run; resume it with --resume "
                    "or choose another output directory"
                )
            if self._is_rank_zero:
                self.output.mkdir(parents=True, exist_ok=True)
                self.run_log.start_fresh()
            torch.manual_seed(self.spec.seed)
            work = {a.name: self.admission.work(a) for a in self.spec.adapters}
            self.pending = self.parallel.place(work, self.pending)
            return
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(self.output)}")
        self._restore(checkpoint.load_checkpoint(latest))

    def _restore(self, state: dict) -> None:
        checkpoint.check_same_training(state, self.spec)
        self.fleet_step = state["fleet_step"]
        self.result.losses = state["losses"]
        self.result.diverged = list(state.get("diverged", []))  # finished too, but never saved
        for name in state["finished"]:
            if name not in self.result.diverged:
                self.result.adapters[name] = FleetDir(self.output).adapter(name)
        by_name = {a.name: a for a in self.spec.adapters}
        self.pending = self.parallel.place(self.admission.remaining_work(state), self.pending)
        for name, job_state in state["active"].items():
            if not self.parallel.trains(name):
                continue
            job = self._start(by_name[name])
            job.load_state_dict(job_state)
            self.parallel.resumed(job)
            self.bars.resumed(job)
        started = set(state["finished"]) | set(state["active"])
        self.pending = deque(a for a in self.pending if a.name not in started)
        restore_rng_state(state["rng"])
        self.references.restore(state.get("reference_logps", {}))
        if self._is_rank_zero:
            self.run_log.resume_at(self.fleet_step)


def train_fleet(
    spec: FleetSpec, resume: bool = False, progress: bool = True, base: FrozenBase | None = None
) -> FleetResult:
    """Train every adapter of `spec` together; adapters land in `<output>/adapters/<name>/`. Under
    torchrun (WORLD_SIZE > 1) every process calls this and the run is spread over them
    (train/distributed.py); the result is complete on process 0."""
    if not distributed.launched():
        return FleetTrainer(spec, base=base, progress=progress).run(resume=resume)
    with distributed.process_group(spec) as group:
        return FleetTrainer(spec, base=base, progress=progress, group=group).run(resume=resume)
