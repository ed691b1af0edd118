"""`lorafleet plan`: will this fleet fit in memory, and how many adapters like these would?

Reads the fleet spec and the data (tokenised as the trainer will), builds the base on the meta
device (no weights read), and prints the memory model's prediction (train/memory.py) for each
adapter alone, for the adapters the trainer would run together, and the largest number of copies
of the fleet's biggest adapter that fit in the budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lorafleet.config import FleetSpec
from lorafleet.models.loading import default_device, default_dtype, load_base
from lorafleet.train import memory
from lorafleet.train.trainer import FleetTrainer


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


def training_dtype(spec: FleetSpec) -> torch.dtype:
    """The dtype `lorafleet train` would compute in: the spec's, else bf16 on CUDA and fp32 on CPU
    (the spec's device, else this machine's)."""
    if spec.dtype:
        return getattr(torch, spec.dtype)
    device = torch.device(spec.device) if spec.device else default_device()
    return default_dtype(device)


def plan_fleet(spec: FleetSpec, budget_gb: float | None = None, dtype: torch.dtype | None = None) -> FleetPlan:
    dtype = dtype or training_dtype(spec)
    base = load_base(spec.base, dtype=dtype, weights=False)
    trainer = FleetTrainer(spec, base=base, progress=False)
    if spec.quantize_base == "nf4":  # the skeleton is unquantized: count its language-model Linears as NF4
        trainer.shape = _with_nf4_weights(trainer.shape, base.language_model, dtype)
    budget_gb = budget_gb or spec.memory_budget_gb
    budget = int(budget_gb * memory.GIB) if budget_gb else _local_gpu_budget()
    trainer.memory_budget = budget
    alone = {a.name: trainer.predicted_memory([a]) for a in spec.adapters}
    together = []  # the first adapters the trainer admits: the first always, then while they fit
    for adapter in spec.adapters[: spec.max_concurrent]:
        if together and not trainer.within_budget([*together, adapter]):
            break
        together.append(adapter)
    loads = {a.name: trainer.adapter_load(a) for a in spec.adapters}
    return FleetPlan(
        dtype=str(dtype).removeprefix("torch."),
        weights=alone[spec.adapters[0].name].weights,
        alone=alone,
        together=[a.name for a in together],
        together_estimate=trainer.predicted_memory(together),
        budget=budget,
        fit_count=_copies_that_fit(trainer, loads, budget) if budget is not None else None,
        loads=loads,
    )


def _copies_that_fit(trainer: FleetTrainer, loads: dict, budget: int, limit: int = 100_000) -> int:
    """The most copies of the fleet's largest adapter whose step fits the budget (the prediction
    grows with every copy, so a doubling then bisection search finds it)."""
    largest = max(
        loads.values(), key=lambda load: load.lora_parameters * memory.ADAPTER_STATE_BYTES + load.rows * load.longest
    )

    def fits(count: int) -> bool:
        copies = [dataclasses.replace(largest, name=f"copy{i}") for i in range(count)]
        return trainer.predicted_memory_of(copies).total <= budget

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
    return "\n".join(lines)
