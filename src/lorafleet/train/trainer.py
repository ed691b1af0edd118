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
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import Batch, pack_micro_batches, stack_micro_batches
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.data.stream import ExampleStream
from lorafleet.errors import AdapterError, ConfigError, TrainingError
from lorafleet.models import varlen
from lorafleet.models.attention import training_attention
from lorafleet.models.hf_compat import checkpoint_layer, inner_model
from lorafleet.models.loading import FrozenBase, load_base
from lorafleet.segments import Segment
from lorafleet.state import restore_rng_state, rng_state
from lorafleet.train import checkpoint, memory
from lorafleet.train.job import AdapterJob
from lorafleet.train.loss import LabelPositions, chunked_segment_losses, label_positions, segment_losses
from lorafleet.train.optimizer import FleetAdamW
from lorafleet.train.provenance import TrainingProvenance
from lorafleet.train.run_log import RunLog


@dataclass
class StepInputs:
    """One fleet step, assembled on the host."""

    batch: Batch  # on the device
    segments: list[Segment]  # routing: every adapter's rows or tokens (and a packed row's padding tail)
    adapter_segments: list[Segment]  # one per active adapter, in job order: the losses
    tokens: list[int]  # real tokens per adapter
    where: LabelPositions | None  # label positions for the chunked loss (on the device)
    extra: dict  # model keyword arguments (packed sequence offsets for varlen attention)
    packed: bool


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
    ) -> None:
        self.spec = spec
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        self._attention = spec.attention or ("varlen" if spec.packing else None)
        self.base = base or load_base(
            spec.base, spec.device, dtype, quantize=spec.quantize_base, attention=self._attention
        )
        self.fleet = LoRAFleet(self.base.model, self.base.language_prefix)
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
        self.log = RunLog(self.output, spec.report_to)
        self.pending: deque[AdapterSpec] = deque(spec.adapters)
        self.shape = memory.model_shape(self.base.model)
        budget_gb = spec.memory_budget_gb
        self.memory_budget = int(budget_gb * memory.GIB) if budget_gb else memory.default_budget(self.base.device)
        self.loads: dict[str, memory.AdapterLoad] = {}
        self.waiting: set[str] = set()
        self.active: list[AdapterJob] = []
        self.optimizer = FleetAdamW()
        self.bars: dict[str, tqdm] = {}
        self.fleet_step = 0
        self.started = time.perf_counter()

    def run(self, resume: bool = False) -> FleetResult:
        self._prepare_output(resume)
        self.provenance.run_started(self.fleet_step if resume else None)
        try:
            self._admit()
            while self.active:
                self._step()
        finally:
            self.log.close()
        for bar in self.bars.values():
            bar.close()
        self.result.fleet_steps = self.fleet_step
        self.provenance.run_finished(self.fleet_step, self.result.tokens, self.result.adapters)
        return self.result

    # --- one fleet step -------------------------------------------------------------------

    def _step(self) -> None:
        step = self._prepare_step()
        losses = self._forward_backward(step)
        self.fleet_step += 1
        due = [job for job, count in zip(self.active, step.tokens, strict=True) if job.record_micro_batch(count)]
        read = torch.stack([loss.detach() for loss in losses])
        if due:  # queued behind backward on the device: the host does not wait for either
            rates = {job.name: job.learning_rate for job in due}
            grad_norms = self.optimizer.step(rates)
            self.optimizer.zero_grad(list(rates))
            read = torch.cat([read, grad_norms.to(read.dtype)])
        read = read.tolist()  # the step's one synchronisation: losses, then gradient norms
        values = read[: len(losses)]
        for job, grad_norm in zip(due, read[len(losses) :], strict=True):
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
            self._save_checkpoint()
        if self.on_step is not None:
            self.on_step(self.fleet_step)

    def _prepare_step(self) -> StepInputs:
        """The next micro-batch of every active adapter as one batch, and everything the step
        needs to know about its shape, read here on the host (token counts, label positions,
        sequence bounds) so that the step itself never waits for the device."""
        micro_batches = [(job.name, job.stream.next_micro_batch()) for job in self.active]
        packed = self.spec.packing
        pad_id, multiple = self.base.tokenizer.pad_token_id, self.spec.length_multiple
        if packed:
            batch, segments = pack_micro_batches(micro_batches, pad_id, multiple)
        else:
            batch, segments = stack_micro_batches(micro_batches, pad_id, multiple)
        tokens = [sum(example.num_tokens for example in group) for _, group in micro_batches]
        adapter_segments = [segment for segment in segments if segment.adapter is not None]
        where = None
        if self.spec.chunked_loss:
            where = label_positions(batch.labels, adapter_segments, by_token=packed).to(self.base.device)
        extra = {}
        if packed and self._attention == "varlen":
            extra = varlen.sequence_offsets(packed_sequence_lengths(micro_batches, batch), self.base.device)
        return StepInputs(batch.to(self.base.device), segments, adapter_segments, tokens, where, extra, packed)

    def _forward_backward(self, step: StepInputs) -> list[torch.Tensor]:
        """Forward and backward of one fleet step: device work only (tests/train/test_gpu.py runs
        it with CUDA's synchronisation check set to error)."""
        # Backward runs inside the routing too: recomputed layers (activation checkpointing) and
        # the chunked loss run their forward again there.
        with self.fleet.route(step.segments, by_token=step.packed), training_attention():
            losses = self._losses(step.batch, step.adapter_segments, step.packed, step.where, step.extra)
            total = sum(loss / job.spec.grad_accum for loss, job in zip(losses, self.active, strict=True))
            total.backward()
        return losses

    def _losses(self, batch, segments, packed: bool, where, extra: dict) -> list[torch.Tensor]:
        """One loss per adapter segment. The batch goes in without an attention mask: its rows are
        right-padded or packed, so causal attention alone is exact for every real token."""
        head = self.base.model.get_output_embeddings()
        inputs = batch.causal_inputs() | extra
        if self.spec.chunked_loss and not isinstance(head, MultiLoRALinear):
            hidden = inner_model(self.base.model)(**inputs, use_cache=False).last_hidden_state
            return chunked_segment_losses(hidden, head, batch.labels, segments, by_token=packed, where=where)
        logits = self.base.model(**inputs, use_cache=False).logits
        return segment_losses(logits, batch.labels, segments, by_token=packed)

    def _optimizer_stepped(self, jobs: list[AdapterJob]) -> None:
        """Record the optimizer step just taken by each of `jobs` (and the held-out loss of those
        due an evaluation); save and retire finished ones."""
        elapsed = time.perf_counter() - self.started
        step_losses = [job.optimizer_stepped() for job in jobs]
        eval_losses = self._evaluate([job for job in jobs if self._eval_due(job)])
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
            if job.name in eval_losses:
                record["eval_loss"] = eval_losses[job.name]
            self.log.write(record)
            bar = self.bars[job.name]
            shown = {"loss": f"{loss:.4f}", "tok_s": f"{job.tokens / max(elapsed, 1e-9):.0f}"}
            if job.name in eval_losses:
                shown["eval_loss"] = f"{eval_losses[job.name]:.4f}"
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if job.done:
                self._finish(job)

    # --- held-out evaluation --------------------------------------------------------------

    def _eval_due(self, job: AdapterJob) -> bool:
        every = job.spec.eval_every
        return job.name in self.eval_examples and (job.done or (every is not None and job.optimizer_step % every == 0))

    def _evaluate(self, jobs: list[AdapterJob]) -> dict[str, float]:
        """Held-out loss of each of `jobs`: every eval record once, the adapters side by side in each
        batch as in training, averaged over answer tokens as the training loss is. Gradients off,
        so the layers take their inference path (no dropout) and nothing draws on the RNG: a
        resumed run stays exact."""
        if not jobs:
            return {}
        groups = {}
        for job in jobs:
            examples, size = self.eval_examples[job.name], job.spec.micro_batch_size
            groups[job.name] = [examples[i : i + size] for i in range(0, len(examples), size)]
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
        return {name: total / max(counts[name], 1) for name, total in zip(sums, totals, strict=True)}

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
            longest = max(example.num_tokens for example in self.examples[spec.name])
            self.loads[spec.name] = memory.AdapterLoad(spec.name, rank, parameters, spec.micro_batch_size, longest)
        return self.loads[spec.name]

    def _start(self, spec: AdapterSpec) -> AdapterJob:
        if spec.init_from:
            load_adapter(self.fleet, spec.name, spec.init_from)
        else:
            shape = LoRAShape(spec.rank, spec.alpha, spec.dropout, self.targets[spec.name])
            self.fleet.add_adapter(spec.name, shape, seed=spec.seed)
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
        directory = save_adapter(
            self.fleet,
            job.name,
            self.output / "adapters" / job.name,
            self.spec.base,
            {"max_tiles": self.spec.max_tiles},
        )
        self.result.adapters[job.name] = directory
        self.provenance.adapter_saved(job, directory, self.fleet_step, self.result.losses.get(job.name, []))
        self.active.remove(job)
        self.optimizer.remove(job.name)
        self.fleet.remove_adapter(job.name)

    # --- checkpoints ----------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        state = {
            "fleet_step": self.fleet_step,
            "spec": [dataclasses.asdict(a) for a in self.spec.adapters],
            "finished": sorted(self.result.adapters),
            "losses": self.result.losses,
            "active": {job.name: job.state_dict() for job in self.active},
            "rng": rng_state(),
        }
        path = checkpoint.save_checkpoint(self.output, state, self.spec.keep_checkpoints)
        self.provenance.checkpoint_saved(path, self.fleet_step, [job.name for job in self.active])

    def _prepare_output(self, resume: bool) -> None:
        self.provenance = TrainingProvenance(self.spec, self.base, self.examples, self.result.skipped)
        latest = checkpoint.latest_checkpoint(self.output)
        if not resume:
            if latest is not None:
                raise ConfigError(
                    f"{self.output} holds checkpoints of an earlier run; resume it with --resume "
                    "or choose another output directory"
                )
            self.output.mkdir(parents=True, exist_ok=True)
            self.log.start_fresh()
            torch.manual_seed(self.spec.seed)
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
            self.result.adapters[name] = self.output / "adapters" / name
        by_name = {a.name: a for a in self.spec.adapters}
        for name, job_state in state["active"].items():
            job = self._start(by_name[name])
            job.load_state_dict(job_state)
            self.bars[name].update(job.optimizer_step)
        started = set(state["finished"]) | set(state["active"])
        self.pending = deque(a for a in self.spec.adapters if a.name not in started)
        restore_rng_state(state["rng"])
        self.log.resume_at(self.fleet_step)

    # --- set-up ---------------------------------------------------------------------------

    def _targets(self, spec: AdapterSpec) -> tuple[str, ...]:
        try:
            return find_target_modules(self.base.model, self.base.language_prefix, spec.target_modules)
        except AdapterError as err:
            raise AdapterError(f"adapter {spec.name!r}: {err}") from err

    def _load_examples(self, spec: AdapterSpec, path: str | None = None) -> list[Example]:
        """The adapter's training records, or those of `path` (its held-out file)."""
        examples, skipped = load_examples(
            path or spec.data, self.base, self.spec.max_tiles, self.spec.max_seq_len, spec.skip_bad_records
        )
        if skipped:
            self.result.skipped.setdefault(spec.name, []).extend(skipped)
        return examples


def train_fleet(
    spec: FleetSpec, resume: bool = False, progress: bool = True, base: FrozenBase | None = None
) -> FleetResult:
    """Train every adapter of `spec` together; adapters land in `<output>/adapters/<name>/`."""
    return FleetTrainer(spec, base=base, progress=progress).run(resume=resume)


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
