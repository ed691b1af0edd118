"""`lorafleet plan`: will this fleet fit in memory, and how many adapters like these would?

Reads the fleet spec and the data (tokenised as the trainer will), builds the base on the meta
device (no weights read), and prints the memory model's prediction (train/memory.py) for each
adapter alone, for the adapters the trainer would run together, and the largest number of copies
of the fleet's biggest adapter that fit in the budget. It asks the trainer's own admission
(train/admission.py), without building a trainer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from lorafleet.config import FleetSpec
from lorafleet.models.loading import FrozenBase, default_device, default_dtype, load_base
from lorafleet.train import distributed, memory
from lorafleet.train.admission import Admission, target_modules
from lorafleet.train.objectives import objective_for


@dataclass
class FleetPlan:
    weights: int
    alone: dict[str, memory.MemoryEstimate]
    together: list[str]  # the first batch of adapters the trainer admits
    together_estimate: memory.MemoryEstimate
    budget: int | None
    fit_count: int | None  # copies of the largest adapter that fit in the budget
    loads: dict[str, memory.AdapterLoad]
    dtype: str = "bfloat16"  # what the prediction computes in
    parallel: list[ParallelOption] = field(default_factory=list)  # the fleet on 1, 2, 4, 8 GPUs


@dataclass
class ParallelOption:
    """One way to run the fleet on `world` GPUs (torchrun), as the memory model predicts it."""

    mode: str  # single (one process) | adapter | data | fsdp2 (data with shard_base: true)
    world: int
    peak: int  # bytes, on the busiest process, with all of its adapters running at once
    traffic: int  # bytes each process sends per fleet step in which every adapter steps
    speedup: float  # tokens/s over one process, compute-bound, communication not counted
    possible: bool = True  # data-parallel needs micro_batch_size >= world for every adapter

    def fits(self, budget: int | None) -> bool:
        return self.possible and (budget is None or self.peak <= budget)


WORLDS = (1, 2, 4, 8)


def training_dtype(spec: FleetSpec) -> torch.dtype:
    """The dtype `lorafleet train` would compute in: the spec's, else bf16 on CUDA and fp32 on CPU
    (the spec's device, else this machine's)."""
    if spec.dtype:
        return getattr(torch, spec.dtype)
    device = torch.device(spec.device) if spec.device else default_device()
    return default_dtype(device)


def plan_fleet(spec: FleetSpec, budget_gb: float | None = None, dtype: torch.dtype | None = None) -> FleetPlan:
    dtype = dtype or training_dtype(spec)
    admission = planning_admission(spec, budget_gb, dtype)
    budget = admission.budget
    alone = {a.name: admission.predicted_memory([a]) for a in spec.adapters}
    together = []  # the first adapters the trainer admits: the first always, then while they fit
    for adapter in spec.adapters[: spec.max_concurrent]:
        if together and not admission.within_budget([*together, adapter]):
            break
        together.append(adapter)
    loads = {a.name: admission.load(a) for a in spec.adapters}
    work = {a.name: admission.work(a) for a in spec.adapters}
    parallel = [option for world in WORLDS for option in parallel_options(admission, loads, work, world)]
    return FleetPlan(
        dtype=str(dtype).removeprefix("torch."),
        weights=alone[spec.adapters[0].name].weights,
        alone=alone,
        together=[a.name for a in together],
        together_estimate=admission.predicted_memory(together),
        budget=budget,
        fit_count=_copies_that_fit(admission, loads, budget) if budget is not None else None,
        loads=loads,
        parallel=parallel,
    )


def planning_admission(spec: FleetSpec, budget_gb: float | None, dtype: torch.dtype) -> Admission:
    """The trainer's admission for `spec` with the base on the meta device (no weights read): its
    memory predictions and work are what planning asks. `budget_gb`: else the spec's, else 90% of
    this machine's GPU (None on a CPU)."""
    base = load_base(spec.base, dtype=dtype, weights=False)
    shape = memory.model_shape(base.model)
    if spec.quantize_base == "nf4":  # the skeleton is unquantized: count its language-model Linears as NF4
        shape = _with_nf4_weights(shape, base.language_model, dtype)
    budget_gb = budget_gb or spec.memory_budget_gb
    budget = int(budget_gb * memory.GIB) if budget_gb else _local_gpu_budget()
    targets = {a.name: target_modules(base, a) for a in spec.adapters if a.init_from is None}
    return Admission(spec, base, training_items(spec, base), targets, budget, shape)


def training_items(spec: FleetSpec, base: FrozenBase) -> dict[str, list]:
    """Each adapter's training items, read and tokenised as the trainer reads them."""
    return {a.name: objective_for(a).load(a.data, base, spec)[0] for a in spec.adapters}


def parallel_options(
    admission: Admission, loads: dict[str, memory.AdapterLoad], work: dict[str, float], world: int
) -> list[ParallelOption]:
    """The fleet on `world` processes in each mode: the busiest process's peak memory with every
    adapter running at once, what each process sends per step (ring all-reduce: 2(w-1)/w of the
    reduced bytes), and the speed-up over one process if compute alone counted."""
    lora_bytes = 4 * sum(load.lora_parameters for load in loads.values())  # fp32 LoRA gradients
    ring = 2 * (world - 1) / world
    shares = distributed.place(work, world)
    if world == 1:  # one process: every mode is the single-process fleet
        estimate = admission.predicted_memory_of(list(loads.values()))
        return [ParallelOption("single", 1, peak=estimate.total, traffic=0, speedup=1.0)]
    busiest = max(sum(work[name] for name in share) for share in shares)
    adapter = ParallelOption(
        "adapter",
        world,
        peak=max(admission.predicted_memory_of([loads[name] for name in share]).total for share in shares),
        traffic=0,
        speedup=sum(work.values()) / busiest,
    )
    split = [dataclasses.replace(load, rows=math.ceil(load.rows / world)) for load in loads.values()]
    data_estimate = admission.predicted_memory_of(split)
    data = ParallelOption(
        "data",
        world,
        peak=data_estimate.total,
        traffic=int(ring * lora_bytes),
        speedup=float(world),
        possible=all(spec.micro_batch_size >= world for spec in admission.spec.adapters),  # pairs split whole
    )
    # FSDP2 of the frozen base (data mode, shard_base): each process keeps 1/world of the weights and
    # gathers the rest of one decoder layer at a time (two with prefetch), in forward and in backward.
    shape = admission.shape
    layer = (data_estimate.weights - shape.vocab * shape.hidden * admission.base.dtype.itemsize) / max(shape.layers, 1)
    gathered = min(2, shape.layers) * layer * (world - 1) / world
    sharded = data_estimate.weights / world + gathered
    fsdp = ParallelOption(
        "fsdp2",
        world,
        peak=int(data_estimate.total - data_estimate.weights + sharded),
        traffic=int(ring * lora_bytes + 2 * (world - 1) / world * data_estimate.weights),
        speedup=float(world),
        possible=data.possible,
    )
    return [adapter, data, fsdp]


def gpus_needed(plan: FleetPlan, mode: str) -> int | None:
    """The fewest GPUs (of 1, 2, 4, 8) on which every adapter runs at once within the budget."""
    options = [o for o in plan.parallel if o.mode in (mode, "single")]
    return next((o.world for o in options if o.fits(plan.budget)), None)


def _copies_that_fit(admission: Admission, loads: dict, budget: int, limit: int = 100_000) -> int:
    """The most copies of the fleet's largest adapter whose step fits the budget (the prediction
    grows with every copy, so a doubling then bisection search finds it)."""
    largest = max(
        loads.values(), key=lambda load: load.lora_parameters * memory.ADAPTER_STATE_BYTES + load.rows * load.longest
    )

    def fits(count: int) -> bool:
        copies = [dataclasses.replace(largest, name=f"copy{i}") for i in range(count)]
        return admission.predicted_memory_of(copies).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _with_nf4_weights(shape: memory.ModelShape, language_model: torch.nn.Module, dtype: torch.dtype):
    """NF4 stores half a byte per weight plus, with double quantization, about 0.127 bits of scales."""
    linear = sum(m.weight.numel() for m in language_model.modules() if type(m) is torch.nn.Linear)
    nf4_bytes = int(linear * (4 + 0.127) / 8)
    return dataclasses.replace(shape, weight_bytes=shape.weight_bytes - linear * dtype.itemsize + nf4_bytes)


def _local_gpu_budget() -> int | None:
    return memory.default_budget(torch.device("cuda")) if torch.cuda.is_available() else None


def format_plan(plan: FleetPlan, spec: FleetSpec) -> str:
    gib = memory.GIB
    lines = [f"base {spec.base}: weights {plan.weights / gib:.2f} GiB, computing in {plan.dtype}", ""]
    lines.append(f"{'adapter':<16} {'rank':>4} {'LoRA params':>12} {'seqs x longest':>15} {'alone':>10}")
    for name, estimate in plan.alone.items():
        load = plan.loads[name]
        shape = f"{load.rows} x {load.longest}"
        lines.append(
            f"{name:<16} {load.rank:>4} {load.lora_parameters:>12,} {shape:>15} {estimate.total / gib:>6.2f} GiB"
        )
    lines.append("")
    lines.append(f"running together ({', '.join(plan.together)}): peak {plan.together_estimate.describe()}")
    if len(plan.together) < len(plan.alone):
        lines.append(f"the other {len(plan.alone) - len(plan.together)} wait for a place (max_concurrent or memory)")
    if plan.budget is None:
        lines.append("no budget: pass --budget-gb (or set memory_budget_gb) to check the fit")
    else:
        verdict = "fits" if plan.together_estimate.total <= plan.budget else "does NOT fit"
        lines.append(f"budget {plan.budget / gib:.2f} GiB: {verdict}")
        lines.append(f"adapters like the largest one that fit at once: {plan.fit_count}")
    return "\n".join(lines + format_parallel(plan))


def format_parallel(plan: FleetPlan) -> list[str]:
    gib = memory.GIB
    lines = ["", "on more than one GPU (torchrun; every adapter at once; docs/distributed.md):"]
    lines.append(f"{'mode':<8} {'GPUs':>4} {'peak/GPU':>12} {'sent/step':>11} {'speed-up':>9}  fits")
    for option in plan.parallel:
        fits = "-" if plan.budget is None else ("yes" if option.fits(plan.budget) else "no")
        if not option.possible:
            fits = "no (micro_batch_size < GPUs)"
        lines.append(
            f"{option.mode:<8} {option.world:>4} {option.peak / gib:>8.2f} GiB {option.traffic / 2**20:>7.1f} MiB "
            f"{option.speedup:>8.2f}x  {fits}"
        )
    if plan.budget is not None:
        needed = {mode: gpus_needed(plan, mode) for mode in ("adapter", "data", "fsdp2")}
        answer = ", ".join(f"{mode} {count or 'more than 8'}" for mode, count in needed.items())
        lines.append(f"GPUs for every adapter at once: {answer} (fsdp2: mode data with shard_base)")
    return lines
