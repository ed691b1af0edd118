"""CPU stand-ins for GPU speed: what one fleet step asks of the device, counted without a GPU.

On a GPU the fleet step is bound by the host: every aten operation that computes is a kernel
launch and some Python, every new shape a kernel plan. So the tests count operations
(TorchDispatchMode sees each one; views, which launch nothing, are left out) and distinct
attention shapes. A regression that adds a per-adapter loop or a per-step shape
fails here, in CI, long before anyone measures it on a GPU.
"""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from lorafleet.config import ALL_PROJECTIONS, AdapterSpec, FleetSpec
from lorafleet.train.trainer import FleetTrainer
from tests.conftest import write_text_dataset


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.attention_shapes: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view:
            self.ops[name] += 1
        if "scaled_dot_product" in name and "backward" not in name:
            self.attention_shapes.add(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def trainer(tiny_lm_dir, tmp_path, adapters: int, rows: int, dora_every: int = 0, **fleet) -> FleetTrainer:
    """`adapters` adapters of `rows` rows each; with `dora_every`, every so many of them DoRA."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_text_dataset(tmp_path / "d.jsonl", n=40, seed=0)
    specs = [
        AdapterSpec(name=f"a{i}", data=str(data), rank=8, target_modules=list(ALL_PROJECTIONS),
                    micro_batch_size=rows, steps=50, seed=i, shuffle=False,
                    variant="dora" if dora_every and i % dora_every == 0 else "lora")
        for i in range(adapters)
    ]  # fmt: skip
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "out"), adapters=specs, checkpoint_every=0,
                     max_concurrent=adapters, **fleet)  # fmt: skip
    fleet_trainer = FleetTrainer(spec, progress=False)
    fleet_trainer._prepare_output(resume=False)
    fleet_trainer._admit()
    return fleet_trainer


def ops_of_one_step(fleet_trainer: FleetTrainer) -> int:
    fleet_trainer._step()  # warm: first-step caches, optimizer state
    with OpCounter() as counter:
        fleet_trainer._step()
    return sum(counter.ops.values())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_eight_adapters_cost_about_the_ops_of_one_with_eight_rows(tiny_lm_dir, tmp_path, packing):
    """The whole step (forward, backward, loss, every adapter's optimizer step): adapters must not
    multiply the operations the way a per-adapter loop over layers would."""
    one = ops_of_one_step(trainer(tiny_lm_dir, tmp_path / "one", adapters=1, rows=8, packing=packing))
    eight = ops_of_one_step(trainer(tiny_lm_dir, tmp_path / "eight", adapters=8, rows=1, packing=packing))
    assert eight <= 1.25 * one, f"8 adapters x 1 row: {eight} ops; 1 adapter x 8 rows: {one}"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_dora_adapters_in_the_fleet_keep_the_ops_within_the_same_bound(tiny_lm_dir, tmp_path, packing):
    """Half the fleet DoRA: the norms, magnitudes and per-row scales are a few operations per
    projection for all DoRA adapters at once, not per adapter."""
    one = ops_of_one_step(trainer(tiny_lm_dir, tmp_path / "one", adapters=1, rows=8, dora_every=1, packing=packing))
    eight = ops_of_one_step(trainer(tiny_lm_dir, tmp_path / "eight", adapters=8, rows=1, dora_every=2, packing=packing))
    assert eight <= 1.25 * one, f"8 adapters (4 DoRA) x 1 row: {eight} ops; 1 DoRA adapter x 8 rows: {one}"


def test_attention_sees_no_more_shapes_than_length_buckets(tiny_lm_dir, tmp_path):
    fleet_trainer = trainer(tiny_lm_dir, tmp_path, adapters=3, rows=2)
    lengths = set()
    with OpCounter() as counter:
        for _ in range(20):
            fleet_trainer._step()
            lengths.update(example.num_tokens for job in fleet_trainer.active for example in job.stream.examples)
    buckets = {-(-length // 64) for length in lengths}
    assert len(lengths) > len(buckets), "the data must have more lengths than buckets for this to mean anything"
    assert len(counter.attention_shapes) <= len(buckets), counter.attention_shapes
