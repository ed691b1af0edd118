"""The concurrent trainer: many adapters, one forward/backward over the frozen base per step.

One fleet step stacks the next micro-batch of every active adapter into one batch, runs the base
once with each adapter's LoRA update on its own rows, and backpropagates the sum of the adapters'
losses (each divided by its own gradient accumulation). Adapter parameters are disjoint and rows
do not interact, so each adapter receives exactly the gradient it would receive alone; then each
adapter steps its own optimizer when its own accumulation is complete. Finished adapters are saved
and leave the batch; queued ones join while fewer than `max_concurrent` are active.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.layer import MultiLoRALinear
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.config import MPO_LOSS_WEIGHTS, AdapterSpec, FleetSpec
from lorafleet.data.batch import Batch, pack_micro_batches, stack_micro_batches
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.data.preference import PreferencePair, load_preference_pairs
from lorafleet.data.stream import ExampleStream
from lorafleet.errors import AdapterError, ConfigError, TrainingError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import utc_now
from lorafleet.models import varlen
from lorafleet.models.attention import training_attention
from lorafleet.models.hf_compat import checkpoint_layer, inner_model
from lorafleet.models.loading import FrozenBase, default_dtype, load_base
from lorafleet.segments import Segment
from lorafleet.state import restore_rng_state, rng_state
from lorafleet.train import checkpoint, distributed, memory
from lorafleet.train.job import AdapterJob, total_optimizer_steps
from lorafleet.train.loss import (
    LabelPositions,
    chunked_segment_losses,
    label_positions,
    loss_dtype,
    segment_losses,
)
from lorafleet.train.objectives import AnswerLogProbs, is_preference, metric_names, preference_loss
from lorafleet.train.optimizer import FleetAdamW
from lorafleet.train.provenance import TrainingProvenance
from lorafleet.train.run_log import RunLog


@dataclass
class StepInputs:
    """One fleet step, assembled on the host."""

    batch: Batch  # on the device
    segments: list[Segment]  # routing: every adapter's rows or tokens (and a packed row's padding tail)
    loss_segments: list[Segment]  # what a loss is taken over: an SFT adapter's segment, each answer of a pair
    owners: list[int]  # the job (index into the active jobs) of each loss segment
    tokens: list[int]  # real tokens per adapter
    where: LabelPositions | None  # label positions for the chunked loss (on the device)
    extra: dict  # model keyword arguments (packed sequence offsets for varlen attention)
    packed: bool
    pairs: dict[int, list[PreferencePair]]  # preference jobs: the micro-batch's pairs (this process's share)
    answer_tokens: dict[int, torch.Tensor]  # preference jobs: label tokens of each answer (on the device)
    references: dict[int, torch.Tensor] = field(default_factory=dict)  # their reference log-probabilities
    # data-parallel: this process's share of each job's micro-batch: of its label tokens (sft), or
    # (of its pairs, of its chosen answers' label tokens) for a preference job
    shares: list | None = None
    # data-parallel: each preference job's whole micro-batch (every process's pairs), the same everywhere
    drawn_pairs: dict[int, list[PreferencePair]] = field(default_factory=dict)


@dataclass
class FleetResult:
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> PEFT directory
    losses: dict[str, list[float]] = field(default_factory=dict)  # per optimizer step
    skipped: dict[str, list[str]] = field(default_factory=dict)  # bad records skipped, per adapter
    fleet_steps: int = 0
    tokens: int = 0  # non-padding tokens of all adapters processed so far


class FleetTrainer:
    def __init__(
        self,
        spec: FleetSpec,
        base: FrozenBase | None = None,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
        group: distributed.Group | None = None,
    ) -> None:
        self.group = group
        if group is not None:
            spec = dataclasses.replace(spec, device=str(group.device))
            progress = progress and group.main
        self.spec = spec
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        self._attention = spec.attention or ("varlen" if spec.packing else None)
        shards = group is not None and group.shards_base
        if shards:
            dtype = dtype or default_dtype(group.device)
        # a sharded base is read on the CPU and moved to the device a shard at a time
        self.base = base or load_base(
            spec.base, "cpu" if shards else spec.device, dtype, quantize=spec.quantize_base, attention=self._attention
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
        self.progress = progress
        self.on_step = on_step
        self.result = FleetResult()
        self.targets = {a.name: self._targets(a) for a in spec.adapters if a.init_from is None}
        self.examples = {a.name: self._load_examples(a) for a in spec.adapters}
        self.eval_examples = {a.name: self._load_examples(a, a.eval_data) for a in spec.adapters if a.eval_data}
        # Preference adapters: summed log-probabilities of each pair's answers under the reference
        # (which never changes), computed once when a pair is first met: adapter -> source -> (2,)
        self.reference_logps: dict[str, dict[str, torch.Tensor]] = {}
        self.fleet_log = RunLog(self.output, spec.report_to)  # metrics.jsonl: written by process 0 alone
        # What this process would write to the fleet's files when it does not write them itself
        self.outbox = Outbox(keep=group is not None and not group.data_parallel)
        self.log = self.fleet_log if self._writes_directly else self.outbox
        self.share: set[str] | None = None  # adapter-parallel: the adapters this process trains
        self.pending: deque[AdapterSpec] = deque(spec.adapters)
        self.shape = memory.model_shape(self.base.model)
        if shards:  # what this process holds of the weights (the gathered layers are in the margin)
            self.shape = dataclasses.replace(self.shape, weight_bytes=self.shape.weight_bytes // group.world)
        budget_gb = spec.memory_budget_gb
        self.memory_budget = int(budget_gb * memory.GIB) if budget_gb else memory.default_budget(self.base.device)
        self.loads: dict[str, memory.AdapterLoad] = {}
        self.waiting: set[str] = set()
        self.active: list[AdapterJob] = []
        self.optimizer = FleetAdamW()
        self.bars: dict[str, tqdm] = {}
        self.fleet_step = 0
        self.started = time.perf_counter()
        if self._data_parallel:
            too_small = [a.name for a in spec.adapters if a.micro_batch_size < group.world]
            if too_small:
                raise ConfigError(
                    f"parallel mode data splits each micro-batch's examples across the {group.world} processes: "
                    f"give {', '.join(too_small)} a micro_batch_size of at least {group.world} (and grad_accum "
                    "divided as much), or use parallel: {mode: adapter}"
                )

    @property
    def _data_parallel(self) -> bool:
        return self.group is not None and self.group.data_parallel

    @property
    def _adapter_parallel(self) -> bool:
        return self.group is not None and not self.group.data_parallel

    @property
    def _main(self) -> bool:
        return self.group is None or self.group.main

    @property
    def _writes_directly(self) -> bool:
        """Metrics and provenance go straight to the fleet's files: one process, or process 0 of a
        data-parallel run (adapter-parallel processes send theirs to process 0 when they meet)."""
        return self.group is None or (self.group.data_parallel and self.group.main)

    def run(self, resume: bool = False) -> FleetResult:
        self._prepare_output(resume)
        if self._main:
            self.fleet_provenance.run_started(self.fleet_step if resume else None)
        try:
            while True:
                self._admit()
                while self.active:
                    self._step()
                # adapter-parallel: this share is trained; wait for the others' next checkpoint step
                # (which may hand this process queued adapters of theirs) or their end
                if not self._adapter_parallel or self._exchange(done=True):
                    break
        finally:
            self.fleet_log.close()
        for bar in self.bars.values():
            bar.close()
        self.result.fleet_steps = self.fleet_step
        if self._adapter_parallel and self._main:  # the whole fleet's, gathered at the end
            self.result.tokens, self.result.fleet_steps = self.fleet_totals
            saved = self.result.adapters
            self.result.adapters = {a.name: saved[a.name] for a in self.spec.adapters if a.name in saved}
        if self._main:
            self.fleet_provenance.run_finished(self.result.fleet_steps, self.result.tokens, self.result.adapters)
        return self.result

    # --- one fleet step -------------------------------------------------------------------

    def _step(self) -> None:
        step = self._prepare_step()
        if self._data_parallel:  # every process caches the whole micro-batch's references, together
            self._cache_references([(self.active[index], pairs) for index, pairs in step.drawn_pairs.items()], True)
        step.references = self._references({index: (self.active[index], pairs) for index, pairs in step.pairs.items()})
        losses, statistics = self._forward_backward(step)
        self.fleet_step += 1
        due = [job for job, count in zip(self.active, step.tokens, strict=True) if job.record_micro_batch(count)]
        if self._data_parallel:
            losses, statistics = self._sum_over_processes(losses, statistics, due)
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
        for job, value in zip(self.active, values, strict=True):
            if not math.isfinite(value):  # stop before anything of it is saved
                raise TrainingError(
                    f"adapter {job.name!r}: the loss became {value} at fleet step {self.fleet_step} "
                    f"(optimizer step {job.optimizer_step + 1}); its weights are not saved. Lower its "
                    f"learning_rate ({job.spec.learning_rate:g}) or keep max_grad_norm on, and train "
                    "again (or --resume from the last checkpoint)"
                )
            job.add_loss(value)
        self.result.tokens += sum(step.tokens)
        if due:
            self._optimizer_stepped(due)
        self._admit()
        if self.spec.checkpoint_every and self.fleet_step % self.spec.checkpoint_every == 0 and self.active:
            self._checkpoint()
        if self.on_step is not None:
            self.on_step(self.fleet_step)

    def _prepare_step(self) -> StepInputs:
        """The next micro-batch of every active adapter as one batch, and everything the step
        needs to know about its shape, read here on the host (token counts, label positions,
        sequence bounds) so that the step itself never waits for the device."""
        drawn = [job.stream.next_micro_batch() for job in self.active]
        preference = {index for index, job in enumerate(self.active) if is_preference(job.spec)}
        rows = lambda index, group: answer_rows(group) if index in preference else group  # noqa: E731
        tokens = [sum(example.num_tokens for example in rows(index, group)) for index, group in enumerate(drawn)]
        shares, drawn_pairs = None, {}
        if self._data_parallel:
            drawn_pairs = {index: group for index, group in enumerate(drawn) if index in preference}
            drawn, shares = self._my_share(drawn, preference)
        pairs = {index: group for index, group in enumerate(drawn) if index in preference}
        # A preference micro-batch of m pairs is 2m sequences: [chosen_1..m, rejected_1..m].
        micro_batches = [
            (job.name, rows(index, group)) for index, (job, group) in enumerate(zip(self.active, drawn, strict=True))
        ]
        packed = self.spec.packing
        pad_id, multiple = self.base.tokenizer.pad_token_id, self.spec.length_multiple
        if packed:
            batch, segments = pack_micro_batches(micro_batches, pad_id, multiple)
        else:
            batch, segments = stack_micro_batches(micro_batches, pad_id, multiple)
        adapter_segments = [segment for segment in segments if segment.adapter is not None]
        loss_segments, owners, answer_tokens = [], [], {}
        for index, (segment, (_, group)) in enumerate(zip(adapter_segments, micro_batches, strict=True)):
            pieces = answer_segments(segment, group, packed) if index in pairs else [segment]
            loss_segments += pieces
            owners += [index] * len(pieces)
            if index in pairs:
                counts = torch.tensor([label_count(example) for example in group], dtype=self.master_dtype)
                answer_tokens[index] = counts.to(self.base.device, non_blocking=True)
        where = None
        if self.spec.chunked_loss:
            where = label_positions(batch.labels, loss_segments, by_token=packed).to(self.base.device)
        extra = {}
        if packed and self._attention == "varlen":
            extra = varlen.sequence_offsets(packed_sequence_lengths(micro_batches, batch), self.base.device)
        return StepInputs(
            batch.to(self.base.device),
            segments,
            loss_segments,
            owners,
            tokens,
            where,
            extra,
            packed,
            pairs,
            answer_tokens,
            shares=shares,
            drawn_pairs=drawn_pairs,
        )

    def _forward_backward(self, step: StepInputs) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Forward and backward of one fleet step: device work only (tests/train/test_gpu.py runs
        it with CUDA's synchronisation check set to error). Returns each job's loss, and the
        statistics of the preference jobs (by job index)."""
        # Backward runs inside the routing too: recomputed layers (activation checkpointing) and
        # the chunked loss run their forward again there.
        with self.fleet.route(step.segments, by_token=step.packed), training_attention():
            pieces = self._losses(step.batch, step.loss_segments, step.packed, step.where, step.extra)
            losses, statistics = self._job_losses(pieces, step)
            total = sum(loss / job.spec.grad_accum for loss, job in zip(losses, self.active, strict=True))
            total.backward()
        return losses, statistics

    def _job_losses(
        self, pieces: list[torch.Tensor], step: StepInputs
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Each job's loss from the mean losses of the loss segments: an SFT job's is its one
        segment's; a preference job's is its objective over its answers' summed log-probabilities."""
        losses, statistics = [], {}
        for index, job in enumerate(self.active):
            mine = [piece for piece, owner in zip(pieces, step.owners, strict=True) if owner == index]
            if index not in step.pairs:
                losses.append(mine[0])
                continue
            tokens = step.answer_tokens[index]
            logps = AnswerLogProbs(-torch.stack(mine) * tokens, step.references[index], tokens, self.base.dtype)
            if step.shares is None:
                loss, statistics[index] = preference_loss(job.spec, logps)
            else:
                loss, statistics[index] = shared_preference_loss(job.spec, logps, *step.shares[index])
            losses.append(loss)
        if step.shares is not None:  # this process's part of each mean over the whole micro-batch
            losses = [loss if index in step.pairs else loss * step.shares[index] for index, loss in enumerate(losses)]
        return losses, statistics

    def _losses(self, batch, segments, packed: bool, where, extra: dict) -> list[torch.Tensor]:
        return sequence_losses(self.base, batch, segments, packed, where, extra, self.spec.chunked_loss)

    def _optimizer_stepped(self, jobs: list[AdapterJob]) -> None:
        """Record the optimizer step just taken by each of `jobs` (and the held-out loss of those
        due an evaluation); save and retire finished ones."""
        elapsed = time.perf_counter() - self.started
        step_losses = [job.optimizer_stepped() for job in jobs]
        evaluations = self._evaluate([job for job in jobs if self._eval_due(job)])
        for job, loss in zip(jobs, step_losses, strict=True):
            self.result.losses.setdefault(job.name, []).append(loss)
            record = {
                "adapter": job.name,
                "step": job.optimizer_step,
                "fleet_step": self.fleet_step,
                "loss": loss,
                "grad_norm": job.last_grad_norm,  # before clipping
                "lr": job.last_learning_rate,
                "tokens": job.tokens,
                "epoch": round(job.stream.epoch, 4),
                "elapsed_s": round(elapsed, 3),
            }
            if is_preference(job.spec):
                record |= dict(zip(metric_names(job.spec), job.take_statistics(), strict=True))
            record |= evaluations.get(job.name, {})
            self.log.write(record)
            bar = self.bars[job.name]
            shown = {"loss": f"{loss:.4f}", "tok_s": f"{job.tokens / max(elapsed, 1e-9):.0f}"}
            if "reward_accuracy" in record:
                shown["acc"] = f"{record['reward_accuracy']:.2f}"
            if "eval_loss" in record:
                shown["eval_loss"] = f"{record['eval_loss']:.4f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if job.done:
                self._finish(job)

    # --- held-out evaluation --------------------------------------------------------------

    def _eval_due(self, job: AdapterJob) -> bool:
        if self._data_parallel and not self.group.main and not self.group.shards_base:
            return False  # the weights are the same everywhere: process 0 evaluates (a sharded base needs all)
        every = job.spec.eval_every
        return job.name in self.eval_examples and (job.done or (every is not None and job.optimizer_step % every == 0))

    def _evaluate(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """Held-out numbers of each of `jobs` (eval_loss, and for preference adapters the reward
        accuracy and margin). Gradients off, so the layers take their inference path (no dropout)
        and nothing draws on the RNG: a resumed run stays exact."""
        preference = [job for job in jobs if is_preference(job.spec)]
        sft = [job for job in jobs if not is_preference(job.spec)]
        return self._evaluate_sft(sft) | self._evaluate_preference(preference)

    def _evaluate_preference(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """The objective and its statistics over every held-out pair, a micro-batch at a time,
        weighted by pairs."""
        if not jobs:
            return {}
        chunks = {job.name: _chunks(self.eval_examples[job.name], job.spec.micro_batch_size) for job in jobs}
        sums: dict[str, list[torch.Tensor]] = {job.name: [] for job in jobs}
        for index in range(max(len(c) for c in chunks.values())):
            batch_jobs = [(job, chunks[job.name][index]) for job in jobs if index < len(chunks[job.name])]
            # over a sharded base every process evaluates every pair, and computes references together
            together = self._data_parallel and self.group.shards_base
            references = self._references(dict(enumerate(batch_jobs)), together)
            policies = self._answer_logps([(job.name, pairs) for job, pairs in batch_jobs])
            for number, ((job, pairs), policy) in enumerate(zip(batch_jobs, policies, strict=True)):
                tokens = torch.tensor([label_count(e) for e in answer_rows(pairs)], device=policy.device)
                logps = AnswerLogProbs(policy, references[number], tokens, self.base.dtype)
                loss, statistics = preference_loss(job.spec, logps)
                sums[job.name].append(torch.cat([loss.detach()[None], statistics[-2:]]) * len(pairs))
        totals = torch.stack([torch.stack(parts).sum(0) for parts in sums.values()]).tolist()  # one sync
        results = {}
        for job, (loss, margin, accuracy) in zip(jobs, totals, strict=True):
            count = len(self.eval_examples[job.name])
            results[job.name] = {
                "eval_loss": loss / count,
                "eval_reward_margin": margin / count,
                "eval_reward_accuracy": accuracy / count,
            }
        return results

    def _evaluate_sft(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """Held-out loss: every eval record once, the adapters side by side in each batch as in
        training, averaged over answer tokens as the training loss is."""
        if not jobs:
            return {}
        groups = {job.name: _chunks(self.eval_examples[job.name], job.spec.micro_batch_size) for job in jobs}
        sums: dict[str, list[torch.Tensor]] = {job.name: [] for job in jobs}
        counts = dict.fromkeys(sums, 0)
        pad_id, multiple = self.base.tokenizer.pad_token_id, self.spec.length_multiple
        with torch.no_grad(), training_attention():
            for index in range(max(len(batches) for batches in groups.values())):
                micro_batches = [(name, batches[index]) for name, batches in groups.items() if index < len(batches)]
                batch, segments = stack_micro_batches(micro_batches, pad_id, multiple)
                adapter_segments = [segment for segment in segments if segment.adapter is not None]
                where = None
                if self.spec.chunked_loss:
                    where = label_positions(batch.labels, adapter_segments).to(self.base.device)
                with self.fleet.route(segments):
                    losses = self._losses(batch.to(self.base.device), adapter_segments, False, where, {})
                for segment, loss in zip(adapter_segments, losses, strict=True):
                    # the loss is a mean over the segment's label tokens (labels shifted by one)
                    count = int((batch.labels[segment.start : segment.end, 1:] != IGNORE_INDEX).sum())
                    sums[segment.adapter].append(loss * count)
                    counts[segment.adapter] += count
        totals = torch.stack([torch.stack(parts).sum() for parts in sums.values()]).tolist()  # one sync
        return {name: {"eval_loss": total / max(counts[name], 1)} for name, total in zip(sums, totals, strict=True)}

    # --- preference objectives: log-probabilities of answers --------------------------------

    def _references(
        self, items: dict[int, tuple[AdapterJob, list[PreferencePair]]], together: bool = False
    ) -> dict[int, torch.Tensor]:
        """Reference log-probabilities of the answers of each item's pairs, [chosen..., rejected...],
        from the cache, into which pairs met for the first time go first (`_cache_references`)."""
        self._cache_references(list(items.values()), together)
        references = {}
        for index, (job, pairs) in items.items():
            known = self.reference_logps[job.name]
            references[index] = torch.stack([known[pair.source] for pair in pairs], 1).reshape(-1)
        return references

    def _cache_references(self, items: list[tuple[AdapterJob, list[PreferencePair]]], together: bool) -> None:
        """Compute and keep the reference log-probabilities (chosen, rejected) of the pairs of `items`
        not met before, in one no-grad pass routed to no adapter (reference: base) or to the adapter's
        frozen initial weights (reference: init).

        `together` (data-parallel; `items` the same on every process): every process keeps every
        pair's references. The processes then agree without a word on which pairs are new, split
        them r::world, each computes its part, and one all-reduce hands all of them to everyone:
        each pair is computed once, and every process runs the same reference forwards, which a
        sharded base needs (each forward gathers every layer from all processes; one process
        skipping a forward another runs would leave that one waiting until the timeout). Keeping
        only one's own pairs instead would make "new" differ between processes from the second
        shuffled epoch on, and agreeing on it each step would cost every step a synchronisation."""
        new = {(job.name, pair.source): (job, pair) for job, pairs in items for pair in pairs}
        new = [item for key, item in new.items() if key[1] not in self.reference_logps.setdefault(key[0], {})]
        if not new:
            return
        rank, world = (self.group.rank, self.group.world) if together else (0, 1)
        mine = new[rank::world]
        # a process with no new pair of its own still runs the forward (on one it drops): see above
        values = self._reference_values(mine or new[:1])[: len(mine)]
        if together:
            everyone = values.new_zeros(len(new), 2)
            everyone[rank::world] = values
            values = self.group.all_reduce(everyone)  # each row is one process's values plus zeros: exact
        for (job, pair), pair_values in zip(new, values, strict=True):
            self.reference_logps[job.name][pair.source] = pair_values

    def _reference_values(self, new: list[tuple[AdapterJob, PreferencePair]]) -> torch.Tensor:
        """(pairs, 2): the reference log-probabilities of the chosen and rejected answer of each of
        `new`, in one pass over every job's pairs."""
        by_job: dict[str, tuple[AdapterJob, list[int]]] = {}
        for position, (job, _) in enumerate(new):
            by_job.setdefault(job.name, (job, []))[1].append(position)
        groups = [(reference_route(job.spec), [new[i][1] for i in positions]) for job, positions in by_job.values()]
        values = torch.empty(len(new), 2, dtype=self.master_dtype, device=self.base.device)
        for (_, positions), logps in zip(by_job.values(), self._answer_logps(groups), strict=True):
            values[positions] = torch.stack(logps.chunk(2), 1).to(values.dtype)
        return values

    def _answer_logps(self, groups: list[tuple[str | None, list[PreferencePair]]]) -> list[torch.Tensor]:
        return answer_logps(self.base, self.fleet, groups, self.spec.length_multiple, self.spec.chunked_loss)

    # --- admission and completion ---------------------------------------------------------

    def _admit(self) -> None:
        """Start waiting adapters while there is room: fewer than max_concurrent running, and the
        predicted peak memory with the newcomer within the budget. A fleet step never goes out of
        memory because an adapter joined; the first adapter always starts (with a warning when
        even it alone is predicted not to fit)."""
        while self.pending and len(self.active) < self.spec.max_concurrent:
            candidate = self.pending[0]
            prediction = self.predicted_memory([*(job.spec for job in self.active), candidate])
            if self.memory_budget is not None and prediction.total > self.memory_budget:
                budget = f"budget {self.memory_budget / memory.GIB:.2f} GiB"
                if self.active:
                    if candidate.name not in self.waiting:
                        self.waiting.add(candidate.name)
                        tqdm.write(f"{candidate.name} waits: predicted peak {prediction.describe()} > {budget}")
                    return
                warnings.warn(
                    f"{candidate.name} alone is predicted to need {prediction.describe()} > {budget}; "
                    "starting it anyway (lower micro_batch_size or max_seq_len, or turn on activation_checkpointing)",
                    stacklevel=2,
                )
            self._start(self.pending.popleft())

    def predicted_memory(self, adapters: list[AdapterSpec]) -> memory.MemoryEstimate:
        """Peak memory of a fleet step running `adapters` together (train/memory.py)."""
        return self.predicted_memory_of([self.adapter_load(spec) for spec in adapters])

    def within_budget(self, adapters: list[AdapterSpec]) -> bool:
        return self.memory_budget is None or self.predicted_memory(adapters).total <= self.memory_budget

    def predicted_memory_of(self, loads: list[memory.AdapterLoad]) -> memory.MemoryEstimate:
        return memory.estimate(
            self.shape,
            loads,
            dtype_bytes=self.base.dtype.itemsize,
            packing=self.spec.packing,
            chunked_loss=self.spec.chunked_loss,
            activation_checkpointing=self.spec.activation_checkpointing,
        )

    def adapter_load(self, spec: AdapterSpec) -> memory.AdapterLoad:
        """What `spec` adds to a fleet step, for the memory model (computed once per adapter)."""
        if spec.name not in self.loads:
            if spec.init_from:
                rank, parameters = adapter_file_size(spec.init_from)
            else:
                rank = spec.rank
                parameters = memory.lora_parameters(self.base.model, self.targets[spec.name], rank)
            items = self.examples[spec.name]
            if is_preference(spec):  # each pair is two sequences of the batch
                longest, rows = max(pair.longest for pair in items), 2 * spec.micro_batch_size
            else:
                longest, rows = max(example.num_tokens for example in items), spec.micro_batch_size
            self.loads[spec.name] = memory.AdapterLoad(spec.name, rank, parameters, rows, longest)
        return self.loads[spec.name]

    def _start(self, spec: AdapterSpec) -> AdapterJob:
        if spec.init_from:
            load_adapter(self.fleet, spec.name, spec.init_from, self.master_dtype)
            if is_preference(spec) and spec.reference == "init":  # the same weights, frozen
                load_adapter(self.fleet, reference_route(spec), spec.init_from, self.master_dtype)
                for weight in self.fleet.parameters(reference_route(spec)):
                    weight.requires_grad_(False)
        else:
            shape = LoRAShape(spec.rank, spec.alpha, spec.dropout, self.targets[spec.name])
            self.fleet.add_adapter(spec.name, shape, seed=spec.seed, dtype=self.master_dtype)
        stream = ExampleStream(self.examples[spec.name], spec.micro_batch_size, spec.seed, spec.shuffle)
        job = AdapterJob(spec, stream, self.fleet.parameters(spec.name), self.optimizer)
        self.active.append(job)
        self.provenance.adapter_started(spec.name)
        self.bars[spec.name] = tqdm(
            total=job.total_steps,
            desc=spec.name,
            position=len(self.bars),
            leave=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        return job

    def _finish(self, job: AdapterJob) -> None:
        directory = FleetDir(self.output).adapter(job.name)
        if not self._data_parallel or self.group.main:  # data-parallel copies are all the same
            save_adapter(self.fleet, job.name, directory, self.spec.base, {"max_tiles": self.spec.max_tiles})
        self.result.adapters[job.name] = directory
        self.provenance.adapter_saved(job, directory, self.fleet_step, self.result.losses.get(job.name, []))
        self.active.remove(job)
        self.optimizer.remove(job.name)
        self.fleet.remove_adapter(job.name)
        if reference_route(job.spec) is not None:
            self.fleet.remove_adapter(reference_route(job.spec))
        self.reference_logps.pop(job.name, None)

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self) -> None:
        if self._adapter_parallel:
            self._exchange(done=False)
            return
        state = self._checkpoint_state()
        if self._data_parallel:  # every process holds every pair's reference log-probabilities
            self._sum_accumulated_gradients(state)
        if self._main:
            self._save_checkpoint(state)

    def _checkpoint_state(self) -> dict:
        return {
            "fleet_step": self.fleet_step,
            "spec": [dataclasses.asdict(a) for a in self.spec.adapters],
            "finished": sorted(self.result.adapters),
            "losses": self.result.losses,
            "active": {job.name: job.state_dict() for job in self.active},
            "rng": rng_state(),
            # kept so that a resumed run uses the very numbers the killed one computed
            "reference_logps": {
                name: {source: values.tolist() for source, values in known.items()}
                for name, known in self.reference_logps.items()
            },
        }

    def _save_checkpoint(self, state: dict) -> None:
        path = checkpoint.save_checkpoint(self.output, state, self.spec.keep_checkpoints)
        self.fleet_provenance.checkpoint_saved(path, state["fleet_step"], list(state["active"]))

    def _prepare_output(self, resume: bool) -> None:
        self.fleet_provenance = None
        if self._main:
            self.fleet_provenance = TrainingProvenance(self.spec, self.base, self.examples, self.result.skipped)
        self.provenance = self.fleet_provenance if self._writes_directly else self.outbox
        latest = checkpoint.latest_checkpoint(self.output)
        if not resume:
            if latest is not None:
                raise ConfigError(
                    f"{self.output} holds checkpoints of an earlier run; resume it with --resume "
                    "or choose another output directory"
                )
            if self._main:
                self.output.mkdir(parents=True, exist_ok=True)
                self.fleet_log.start_fresh()
            torch.manual_seed(self.spec.seed)
            self._place({a.name: self.adapter_work(a) for a in self.spec.adapters})
            return
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(self.output)}")
        self._restore(checkpoint.load_checkpoint(latest))

    def _restore(self, state: dict) -> None:
        if [_what_trains(a) for a in state["spec"]] != [
            _what_trains(dataclasses.asdict(a)) for a in self.spec.adapters
        ]:
            raise ConfigError("--resume: the fleet spec changed since the checkpoint; restore it or start a new output")
        self.fleet_step = state["fleet_step"]
        self.result.losses = state["losses"]
        for name in state["finished"]:
            self.result.adapters[name] = FleetDir(self.output).adapter(name)
        by_name = {a.name: a for a in self.spec.adapters}
        self._place(remaining_work(self, state))
        for name, job_state in state["active"].items():
            if self.share is not None and name not in self.share:
                continue
            job = self._start(by_name[name])
            job.load_state_dict(job_state)
            if self._data_parallel and not self.group.main:
                self.optimizer.zero_grad([name])  # process 0 holds the sum accumulated so far
            self.bars[name].update(job.optimizer_step)
        started = set(state["finished"]) | set(state["active"])
        self.pending = deque(a for a in self.pending if a.name not in started)
        restore_rng_state(state["rng"])
        for name, known in state.get("reference_logps", {}).items():
            device, dtype = self.base.device, self.master_dtype
            self.reference_logps[name] = {src: torch.tensor(v, dtype=dtype, device=device) for src, v in known.items()}
        if self._main:
            self.fleet_log.resume_at(self.fleet_step)

    # --- more than one process (train/distributed.py) --------------------------------------

    def adapter_work(self, spec: AdapterSpec) -> float:
        """Tokens an adapter's whole training computes: what adapter-parallel placement balances."""
        items = self.examples[spec.name]
        if is_preference(spec):
            tokens = sum(pair.chosen.num_tokens + pair.rejected.num_tokens for pair in items)
        else:
            tokens = sum(example.num_tokens for example in items)
        steps = total_optimizer_steps(spec, len(items))
        return steps * spec.grad_accum * spec.micro_batch_size * tokens / max(len(items), 1)

    def _place(self, work: dict[str, float]) -> None:
        """Adapter-parallel: keep this process's share of the adapters still to train."""
        if not self._adapter_parallel:
            return
        self.share = set(distributed.place(work, self.group.world)[self.group.rank])
        self.pending = deque(a for a in self.pending if a.name in self.share)

    def _my_share(self, drawn: list[list], preference: set[int]) -> tuple[list[list], list]:
        """Data-parallel: this process's examples (or pairs) of each micro-batch (r::world), and its
        share of what each single-process mean is taken over: an SFT micro-batch's label tokens; a
        preference micro-batch's pairs and its chosen answers' label tokens (the SFT term of MPO).
        Scaled by these, the processes' losses and gradients sum to the single process's."""
        rank, world = self.group.rank, self.group.world
        mine, shares = [], []
        for index, group in enumerate(drawn):
            local = group[rank::world]
            if index in preference:
                chosen = sum(label_count(pair.chosen) for pair in local)
                shares.append((len(local) / len(group), chosen / max(sum(label_count(p.chosen) for p in group), 1)))
            else:
                total = sum(label_count(example) for example in group)
                shares.append(sum(label_count(example) for example in local) / max(total, 1))
            mine.append(local)
        return mine, shares

    def _sum_over_processes(
        self, losses: list[torch.Tensor], statistics: dict[int, torch.Tensor], due: list[AdapterJob]
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Data-parallel: one all-reduce sums the step's losses and preference statistics (each
        process holds its part) and the accumulated gradients of the adapters about to step;
        returns the whole losses and statistics."""
        params = [param for job in due for param in job.params]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        dtype = self.master_dtype
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

    def _sum_accumulated_gradients(self, state: dict) -> None:
        """Data-parallel checkpoint: each process holds its part of the gradients accumulated so far
        in an unfinished optimizer step; the checkpoint holds their sum (process 0 resumes with it)."""
        jobs = [job for job in self.active if job.micro_step % job.spec.grad_accum]
        params = [param for job in jobs for param in job.params]
        if not params:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = self.group.all_reduce(torch.cat([grad.flatten() for grad in grads]))
        sums = iter(flat.cpu().split([p.numel() for p in params]))
        for job in jobs:
            state["active"][job.name]["grads"] = [next(sums).view_as(p).clone() for p in job.params]

    def _exchange(self, done: bool) -> bool:
        """Adapter-parallel meeting at a checkpoint step (or at the end, `done`): process 0 gathers
        every process's metrics, finished adapters and training state, writes them and the
        checkpoint, and places the adapters still queued anywhere afresh, against the work each
        process has left (a process that is done takes some); True when every process is done."""
        mine = self.share or set()
        left = sum(self.adapter_work(job.spec) * (1 - job.optimizer_step / job.total_steps) for job in self.active)
        payload = {
            "done": done,
            "fleet_step": self.fleet_step,
            "queued": [spec.name for spec in self.pending],
            "left": left,
            "tokens": self.result.tokens,
            "records": self.outbox.take_records(),
            "saved": self.outbox.take_saved(),
            "losses": {name: losses for name, losses in self.result.losses.items() if name in mine},
            "active": {} if done else {job.name: job.state_dict() for job in self.active},
            "reference_logps": {
                name: {source: values.tolist() for source, values in known.items()}
                for name, known in self.reference_logps.items()
                if name in mine
            },
        }
        gathered = self.group.gather(payload)
        decision = None
        if self.group.main:
            self._merge(gathered)
            queued = {name: self.adapter_work(self._spec(name)) for item in gathered for name in item["queued"]}
            decision = {
                "finished": all(item["done"] for item in gathered),
                "fleet_step": max(item["fleet_step"] for item in gathered),
                "queued": distributed.place(queued, self.group.world, [item["left"] for item in gathered]),
            }
        decision = self.group.broadcast(decision)
        self.fleet_step = decision["fleet_step"]  # one count of fleet steps, whoever waited
        queued = set(decision["queued"][self.group.rank])
        self.share = (mine - {spec.name for spec in self.pending}) | queued
        self.pending = deque(spec for spec in self.spec.adapters if spec.name in queued)
        return decision["finished"]

    def _spec(self, name: str) -> AdapterSpec:
        return next(spec for spec in self.spec.adapters if spec.name == name)

    def _merge(self, gathered: list[dict]) -> None:
        """Process 0 of an adapter-parallel run: what every process sent, into the fleet's files."""
        order = {a.name: index for index, a in enumerate(self.spec.adapters)}
        records = [record for item in gathered for record in item["records"]]
        for record in sorted(records, key=lambda record: (record["fleet_step"], order[record["adapter"]])):
            self.fleet_log.write(record)
        by_name = {a.name: a for a in self.spec.adapters}
        for item in gathered:
            self.result.losses.update(item["losses"])
            for saved in item["saved"]:
                name = saved["name"]
                self.result.adapters[name] = Path(saved["directory"])
                self.fleet_provenance.started[name] = saved["started"]
                job = SavedJob(by_name[name], saved["optimizer_step"], saved["tokens"])
                self.fleet_provenance.adapter_saved(job, Path(saved["directory"]), saved["fleet_step"], saved["losses"])
        self.fleet_totals = (sum(item["tokens"] for item in gathered), max(item["fleet_step"] for item in gathered))
        running = [item for item in gathered if not item["done"]]
        if not running:
            return
        active = {name: state for item in running for name, state in item["active"].items()}
        references = {name: known for item in running for name, known in item["reference_logps"].items()}
        state = {
            "fleet_step": running[0]["fleet_step"],
            "spec": [dataclasses.asdict(a) for a in self.spec.adapters],
            "finished": sorted(self.result.adapters),
            "losses": self.result.losses,
            "active": dict(sorted(active.items(), key=lambda item: order[item[0]])),
            "rng": rng_state(),
            "reference_logps": references,
        }
        self._save_checkpoint(state)

    # --- set-up ---------------------------------------------------------------------------

    def _targets(self, spec: AdapterSpec) -> tuple[str, ...]:
        try:
            return find_target_modules(self.base.model, self.base.language_prefix, spec.target_modules)
        except AdapterError as err:
            raise AdapterError(f"adapter {spec.name!r}: {err}") from err

    def _load_examples(self, spec: AdapterSpec, path: str | None = None) -> list[Example] | list[PreferencePair]:
        """The adapter's training records (preference pairs for dpo/mpo), or those of `path` (its
        held-out file)."""
        load = load_preference_pairs if is_preference(spec) else load_examples
        examples, skipped = load(
            path or spec.data, self.base, self.spec.max_tiles, self.spec.max_seq_len, spec.skip_bad_records
        )
        if skipped:
            self.result.skipped.setdefault(spec.name, []).extend(skipped)
        return examples


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


@dataclass
class SavedJob:
    """What the provenance of a saved adapter reads from its job, sent by the process that trained it."""

    spec: AdapterSpec
    optimizer_step: int
    tokens: int

    @property
    def name(self) -> str:
        return self.spec.name


class Outbox:
    """Stands in for the run log and the provenance on a process that does not write the fleet's
    files: adapter-parallel processes keep what they would write until process 0 gathers it
    (`keep`); data-parallel processes other than 0 drop it (process 0 writes the same)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.records: list[dict] = []
        self.saved: list[dict] = []
        self.started: dict[str, str] = {}

    def write(self, record: dict) -> None:
        if self.keep:
            self.records.append(record)

    def adapter_started(self, name: str) -> None:
        self.started[name] = utc_now()

    def adapter_saved(self, job: AdapterJob, directory: Path, fleet_step: int, step_losses: list[float]) -> None:
        if self.keep:
            facts = {"name": job.name, "directory": str(directory), "fleet_step": fleet_step}
            facts |= {"losses": list(step_losses), "optimizer_step": job.optimizer_step, "tokens": job.tokens}
            self.saved.append(facts | {"started": self.started.get(job.name)})

    def take_records(self) -> list[dict]:
        records, self.records = self.records, []
        return records

    def take_saved(self) -> list[dict]:
        saved, self.saved = self.saved, []
        return saved


def remaining_work(trainer: FleetTrainer, state: dict) -> dict[str, float]:
    """Work left per unfinished adapter of a checkpoint: what a resumed adapter-parallel run places."""
    work = {}
    for spec in trainer.spec.adapters:
        if spec.name in state["finished"]:
            continue
        done = 0.0
        if spec.name in state["active"]:
            steps = total_optimizer_steps(spec, len(trainer.examples[spec.name]))
            done = state["active"][spec.name]["optimizer_step"] / steps
        work[spec.name] = trainer.adapter_work(spec) * (1 - done)
    return work


def shared_preference_loss(
    spec: AdapterSpec, logps: AnswerLogProbs, pair_share: float, token_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-parallel: this process's part of a preference objective and its statistics. The pair
    terms (DPO sigmoid, BCO pair, reward margin and accuracy) are means over pairs, MPO's SFT term a
    mean over the chosen answers' tokens; each is scaled by this process's share of its own count."""
    names = metric_names(spec)
    # float64 on the host: a share such as 1/3 is rounded once, to the statistics' dtype, not to float32 first
    scale = torch.tensor([token_share if name == "loss_sft" else pair_share for name in names], dtype=torch.float64)
    if spec.objective != "mpo":
        loss, statistics = preference_loss(spec, logps)
        return loss * pair_share, statistics * scale.to(statistics.device, statistics.dtype)
    preference, quality, generation = spec.loss_weights or MPO_LOSS_WEIGHTS
    loss, statistics = preference_loss(dataclasses.replace(spec, loss_weights=[preference, quality, 0.0]), logps)
    sft, _ = preference_loss(dataclasses.replace(spec, loss_weights=[0.0, 0.0, generation]), logps)
    return loss * pair_share + sft * token_share, statistics * scale.to(statistics.device, statistics.dtype)


def sequence_losses(
    base: FrozenBase, batch: Batch, segments, packed: bool, where, extra: dict, chunked: bool
) -> list[torch.Tensor]:
    """One loss per segment (mean over its label tokens). The batch goes in without an attention
    mask: its rows are right-padded or packed, so causal attention alone is exact for every real
    token. `chunked`: only label positions go through the output head (unless the head itself
    carries adapters)."""
    head = base.model.get_output_embeddings()
    inputs = batch.causal_inputs() | extra
    if chunked and not isinstance(head, MultiLoRALinear):
        hidden = inner_model(base.model)(**inputs, use_cache=False).last_hidden_state
        return chunked_segment_losses(hidden, head, batch.labels, segments, by_token=packed, where=where)
    logits = base.model(**inputs, use_cache=False).logits
    return segment_losses(logits, batch.labels, segments, by_token=packed)


def answer_logps(
    base: FrozenBase,
    fleet: LoRAFleet,
    groups: list[tuple[str | None, list[PreferencePair]]],
    length_multiple: int = 1,
    chunked: bool = True,
) -> list[torch.Tensor]:
    """Summed log-probabilities of every answer of each group's pairs under the adapter the group
    is routed to (None: the base alone), [chosen..., rejected...] per group, in one no-grad pass."""
    micro_batches = [(route, answer_rows(pairs)) for route, pairs in groups]
    batch, _ = stack_micro_batches(micro_batches, base.tokenizer.pad_token_id, length_multiple)
    rows = [example for _, group in micro_batches for example in group]
    routes = [route for route, group in micro_batches for _ in group]
    segments = [Segment(route, row, row + 1) for row, route in enumerate(routes)]
    tokens = torch.tensor([label_count(example) for example in rows], dtype=loss_dtype(base.dtype))
    where = label_positions(batch.labels, segments).to(base.device) if chunked else None
    with torch.no_grad(), training_attention(), fleet.route(segments):
        means = sequence_losses(base, batch.to(base.device), segments, False, where, {}, chunked)
    logps = -torch.stack(means) * tokens.to(base.device)
    return list(logps.split([len(group) for _, group in micro_batches]))


def answer_rows(pairs: list[PreferencePair]) -> list[Example]:
    """The sequences of a preference micro-batch, as TRL orders them: every chosen, then every rejected."""
    return [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]


def answer_segments(segment: Segment, rows: list[Example], packed: bool) -> list[Segment]:
    """An adapter's segment cut into one segment per sequence (rows, or a packed row's tokens)."""
    if not packed:
        return [Segment(segment.adapter, row, row + 1) for row in range(segment.start, segment.end)]
    pieces, start = [], segment.start
    for example in rows:
        pieces.append(Segment(segment.adapter, start, start + example.num_tokens))
        start += example.num_tokens
    return pieces


def label_count(example: Example) -> int:
    """Label tokens a loss over `example` averages over (each token predicts the next one's label)."""
    return int((example.labels[1:] != IGNORE_INDEX).sum())


def reference_route(spec: AdapterSpec) -> str | None:
    """Where a preference adapter's reference rows go: the base alone, or its frozen initial weights."""
    # ":" is in no adapter name (config.ADAPTER_NAME), so the reference never meets a real adapter
    return f"{spec.name}:reference" if is_preference(spec) and spec.reference == "init" else None


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def packed_sequence_lengths(micro_batches, batch) -> list[int]:
    """Lengths of the sequences of a packed row, in order, its padding tail included."""
    lengths = [example.num_tokens for _, group in micro_batches for example in group]
    tail = batch.input_ids.shape[1] - sum(lengths)
    return lengths + [tail] if tail else lengths


def compile_decoder_layers(language_model: torch.nn.Module) -> None:
    """Regional compilation: every decoder layer through torch.compile. The layers share their
    code, so one compiled graph serves all of them; a new routing (adapters joining or leaving, a
    new padded length) compiles once more, hence the larger cache."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in language_model.layers:
        layer.compile()


def checkpoint_decoder_layers(language_model: torch.nn.Module) -> None:
    """Recompute every decoder layer in backward (transformers' own checkpointing hook, non-reentrant).
    Only the layers are put in training mode, which that hook requires; the frozen base otherwise
    stays in eval mode. LoRA dropout masks are reproduced exactly (the RNG state is preserved)."""
    for layer in language_model.layers:
        checkpoint_layer(layer)


# Held-out evaluation changes nothing about the weights: a resumed run may add, drop or change it.
NOT_TRAINING = ("eval_data", "eval_every")


def _what_trains(adapter: dict) -> dict:
    """An adapter's spec as a checkpoint compares it: the fields that decide its weights."""
    return {key: value for key, value in adapter.items() if key not in NOT_TRAINING}


def adapter_file_size(directory: str | Path) -> tuple[int, int]:
    """(rank, parameters) of a saved PEFT adapter, read from its files without loading weights."""
    from safetensors import safe_open

    directory = Path(directory)
    rank = json.loads((directory / "adapter_config.json").read_text())["r"]
    with safe_open(directory / "adapter_model.safetensors", "pt") as tensors:
        parameters = sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
    return rank, parameters
