"""One loaded base, several fleets one after another (a sweep's baselines, a notebook): each fleet
trains as it would on a freshly loaded base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import AdapterError
from lorafleet.models.loading import load_base
from lorafleet.train.trainer import FleetTrainer
from tests.conftest import write_text_dataset


def fleet(tiny_lm_dir, data, output, name: str) -> FleetSpec:
    adapter = AdapterSpec(name=name, data=str(data), rank=4, steps=3, micro_batch_size=2, learning_rate=1e-2)
    return FleetSpec(base=str(tiny_lm_dir), output=str(output), adapters=[adapter], checkpoint_every=0)


def weights(output, name: str) -> dict[str, torch.Tensor]:
    return load_file(output / "adapters" / name / "adapter_model.safetensors")


def test_a_second_fleet_on_a_reused_base_trains_as_on_a_fresh_one(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    base = load_base(tiny_lm_dir)
    FleetTrainer(fleet(tiny_lm_dir, data, tmp_path / "first", "a"), base=base, progress=False).run()
    # the base's layers are wrapped by the first fleet now; the second must route through them
    FleetTrainer(fleet(tiny_lm_dir, data, tmp_path / "reused", "b"), base=base, progress=False).run()
    FleetTrainer(fleet(tiny_lm_dir, data, tmp_path / "fresh", "b"), progress=False).run()
    reused, fresh = weights(tmp_path / "reused", "b"), weights(tmp_path / "fresh", "b")
    assert reused.keys() == fresh.keys()
    for key in fresh:  # the same process, the same operations: bit for bit
        assert torch.equal(reused[key], fresh[key]), key


def test_a_base_carrying_another_fleets_adapters_is_refused(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    first = LoRAFleet(base.model)
    module = "model.layers.0.self_attn.q_proj"
    first.add_adapter("a", LoRAShape(2, 4.0, 0.0, (module,)))
    with pytest.raises(AdapterError, match="carries adapters of another fleet"):
        LoRAFleet(base.model).add_adapter("b", LoRAShape(2, 4.0, 0.0, (module,)))
