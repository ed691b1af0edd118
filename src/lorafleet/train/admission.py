"""Admission: which queued adapters join the running ones, and the memory predictions it rests on.

A queued adapter starts while fewer than `max_concurrent` run and the memory model
(train/memory.py) predicts that the fleet step with it stays within the memory budget, so a step
never goes out of memory because an adapter joined. `lorafleet plan` asks the same questions of
the same object before anything is loaded (the base on the meta device) and without a trainer.

What an adapter adds to a step (`load`) is read from its spec, its data and its objective; an
adapter variant with parameters of its own (DoRA's magnitudes) would count them there. Whoever
decides which adapter runs next, such as a sweep that stops trials at rungs, decides it here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from lorafleet.adapters.fleet import find_target_modules
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import AdapterError
from lorafleet.models.loading import FrozenBase
from lorafleet.train import memory
from lorafleet.train.job import total_optimizer_steps
from lorafleet.train.objectives import objective_for


class Admission:
    def __init__(
        self,
        spec: FleetSpec,
        base: FrozenBase,
        examples: dict[str, list],
        targets: dict[str, tuple[str, ...]],
        budget: int | None,
        shape: memory.ModelShape | None = None,
    ) -> None:
        """`examples`: each adapter's training items; `targets`: the modules of each new adapter
        (`target_modules`); `budget`: bytes a step may take (None: no limit); `shape`: what the
        memory model reads of the base (by default the base's own)."""
        self.spec, self.base = spec, base
        self.examples, self.targets = examples, targets
        self.budget = budget
        self.shape = shape or memory.model_shape(base.model)
        self.loads: dict[str, memory.AdapterLoad] = {}
        self.waiting: set[str] = set()  # told to wait already (said once)

    def admits(self, candidate: AdapterSpec, running: list[AdapterSpec]) -> bool:
        """Whether `candidate` may start beside `running`: fewer than max_concurrent running, and the
        predicted peak memory with the newcomer within the budget. The first adapter always starts
        (with a warning when even it alone is predicted not to fit)."""
        if len(running) >= self.spec.max_concurrent:
            return False
        prediction = self.predicted_memory([*running, candidate])
        if self.budget is not None and prediction.total > self.budget:
            budget = f"budget {self.budget / memory.GIB:.2f} GiB"
            if running:
                if candidate.name not in self.waiting:
                    self.waiting.add(candidate.name)
                    tqdm.write(f"{candidate.name} waits: predicted peak {prediction.describe()} > {budget}")
                return False
            warnings.warn(
                f"{candidate.name} alone is predicted to need {prediction.describe()} > {budget}; "
                "starting it anyway (lower micro_batch_size or max_seq_len, or turn on activation_checkpointing)",
                stacklevel=3,
            )
        return True

    def predicted_memory(self, adapters: list[AdapterSpec]) -> memory.MemoryEstimate:
        """Peak memory of a fleet step running `adapters` together (train/memory.py)."""
        return self.predicted_memory_of([self.load(spec) for spec in adapters])

    def within_budget(self, adapters: list[AdapterSpec]) -> bool:
        return self.budget is None or self.predicted_memory(adapters).total <= self.budget

    def predicted_memory_of(self, loads: list[memory.AdapterLoad]) -> memory.MemoryEstimate:
        return memory.estimate(
            self.shape,
            loads,
            dtype_bytes=self.base.dtype.itemsize,
            packing=self.spec.packing,
            chunked_loss=self.spec.chunked_loss,
            activation_checkpointing=self.spec.activation_checkpointing,
        )

    def load(self, spec: AdapterSpec) -> memory.AdapterLoad:
        """What `spec` adds to a fleet step, for the memory model (computed once per adapter)."""
        if spec.name not in self.loads:
            if spec.init_from:
                rank, parameters, dora_outputs = adapter_file_size(spec.init_from)
            else:
                rank, dora = spec.rank, spec.variant == "dora"
                parameters = memory.lora_parameters(self.base.model, self.targets[spec.name], rank, dora)
                if spec.init in ("pissa", "olora"):  # the frozen start doubles the rank its matmuls compute
                    rank *= 2
                dora_outputs = memory.output_features(self.base.model, self.targets[spec.name]) if dora else 0
            objective, items = objective_for(spec), self.examples[spec.name]
            rows, longest = objective.rows_per_micro_batch, objective.longest(items)
            self.loads[spec.name] = memory.AdapterLoad(spec.name, rank, parameters, rows, longest, dora_outputs)
        return self.loads[spec.name]

    def work(self, spec: AdapterSpec) -> float:
        """Tokens an adapter's whole training computes: what adapter-parallel placement balances."""
        items = self.examples[spec.name]
        tokens = objective_for(spec).tokens(items)
        steps = total_optimizer_steps(spec, len(items))
        return steps * spec.grad_accum * spec.micro_batch_size * tokens / max(len(items), 1)

    def remaining_work(self, state: dict) -> dict[str, float]:
        """Work left per unfinished adapter of a checkpoint: what a resumed adapter-parallel run places."""
        work = {}
        for spec in self.spec.adapters:
            if spec.name in state["finished"]:
                continue
            done = 0.0
            if spec.name in state["active"]:
                steps = total_optimizer_steps(spec, len(self.examples[spec.name]))
                done = state["active"][spec.name]["optimizer_step"] / steps
            work[spec.name] = self.work(spec) * (1 - done)
        return work


def memory_budget(spec: FleetSpec, base: FrozenBase) -> int | None:
    """The fleet's `memory_budget_gb` in bytes; by default 90% of the GPU (no limit on the CPU)."""
    budget_gb = spec.memory_budget_gb
    return int(budget_gb * memory.GIB) if budget_gb else memory.default_budget(base.device)


def sharded_shape(shape: memory.ModelShape, world: int) -> memory.ModelShape:
    """What one of `world` processes holds of a sharded base's weights (the layers it gathers are
    in the margin)."""
    return dataclasses.replace(shape, weight_bytes=shape.weight_bytes // world)


def target_modules(base: FrozenBase, spec: AdapterSpec) -> tuple[str, ...]:
    """The modules a new adapter wraps, named in errors by the adapter."""
    try:
        return find_target_modules(base.model, base.language_prefix, spec.target_modules)
    except AdapterError as err:
        raise AdapterError(f"adapter {spec.name!r}: {err}") from err


def adapter_file_size(directory: str | Path) -> tuple[int, int, int]:
    """(rank, parameters, DoRA output features) of a saved PEFT adapter, read from its files
    without loading weights (the last: its magnitude vectors' length, 0 for LoRA)."""
    from safetensors import safe_open

    directory = Path(directory)
    rank = json.loads((directory / "adapter_config.json").read_text())["r"]
    with safe_open(directory / "adapter_model.safetensors", "pt") as tensors:
        sizes = {key: math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    magnitudes = sum(size for key, size in sizes.items() if key.endswith("lora_magnitude_vector"))
    return rank, sum(sizes.values()), magnitudes
