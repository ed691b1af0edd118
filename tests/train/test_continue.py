"""An existing PEFT adapter can be trained further: training starts from its weights."""

from __future__ import annotations

from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset


def test_training_continues_from_an_existing_adapter(tiny_lm_dir, tmp_path):
    data = str(write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0))
    first = AdapterSpec(
        name="hr", data=data, rank=4, target_modules=["q_proj", "down_proj"], steps=5, learning_rate=1e-2
    )
    done = train_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "one"), adapters=[first]), progress=False)
    trained = load_file(done.adapters["hr"] / "adapter_model.safetensors")

    # A vanishing learning rate leaves the weights where they start: at the loaded adapter.
    more = AdapterSpec(name="hr", data=data, steps=2, learning_rate=1e-12, init_from=str(done.adapters["hr"]))
    again = train_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "two"), adapters=[more]), progress=False)
    continued = load_file(again.adapters["hr"] / "adapter_model.safetensors")

    assert continued.keys() == trained.keys()
    assert any(t.abs().max() > 1e-3 for k, t in trained.items() if "lora_B" in k)
    # AdamW moves a weight by at most ~lr a step (|m / (sqrt(v) + eps)| <= 1 in its first steps):
    # two steps at 1e-12 move it by at most 2e-12, far under the 1e-8 allowed
    for key, tensor in trained.items():
        assert (continued[key] - tensor).abs().max().item() < 1e-8, key
