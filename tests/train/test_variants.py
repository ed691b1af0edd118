"""LoRA variants trained in the fleet equal peft training each alone: DoRA, rsLoRA and LoRA+ (peft's
create_loraplus_optimizer), each alone and mixed in one fleet with plain LoRA adapters — losses and
saved weights in float64 (tests/tolerances.py), and the first step's gradients in float32."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.train.trainer import train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset
from tests.train.test_equivalence import (
    fleet_first_step_gradients,
    peft_first_step_gradients,
    train_alone_with_peft,
    with_perturbed_inits,
)


def variant_adapters(data) -> list[AdapterSpec]:
    common = dict(micro_batch_size=2, steps=8)
    return [
        AdapterSpec(name="dora", data=str(data[0]), variant="dora", rank=4, alpha=8, learning_rate=3e-3, grad_accum=2,
                    target_modules=["q_proj", "v_proj", "down_proj"], seed=1, **common),
        AdapterSpec(name="rslora", data=str(data[1]), use_rslora=True, rank=8, alpha=8, learning_rate=1e-3,
                    loraplus_lr_ratio=8, weight_decay=0.05,
                    target_modules=["o_proj", "up_proj", "q_proj"], seed=2, schedule="cosine", **common),
        AdapterSpec(name="plain", data=str(data[2]), rank=2, alpha=4, learning_rate=5e-3,
                    target_modules=["k_proj", "q_proj"], seed=3, schedule="constant", **common),
        AdapterSpec(name="rsdora", data=str(data[0]), variant="dora", use_rslora=True, rank=8, alpha=4,
                    learning_rate=2e-3, loraplus_lr_ratio=4, target_modules=["gate_proj", "v_proj"], seed=4,
                    shuffle=False, **common),
    ]  # fmt: skip


def datasets(tmp_path) -> list:
    return [write_text_dataset(tmp_path / f"d{i}.jsonl", n=9 + 3 * i, seed=i) for i in range(3)]


def assert_trained_like_peft(model_dir, adapters: list[AdapterSpec], tmp_path) -> None:
    spec = FleetSpec(base=str(model_dir), output=str(tmp_path / "fleet"), adapters=adapters, checkpoint_every=0,
                     dtype="float64")  # fmt: skip
    result = train_fleet(spec, progress=False)
    weight_tolerance = tolerances.fleet_weights(adapters)
    for adapter in adapters:
        history: list[tuple[float, float]] = []
        reference = train_alone_with_peft(model_dir, adapter, tmp_path, dtype=torch.float64, history=history)
        ours = load_file(result.adapters[adapter.name] / "adapter_model.safetensors")
        init = load_file(tmp_path / f"init-{adapter.name}" / "adapter_model.safetensors")
        assert ours.keys() == reference.keys()
        assert any(key.endswith("lora_magnitude_vector") for key in ours) == (adapter.variant == "dora")
        moved = max((reference[k] - init[k]).abs().max().item() for k in reference)
        assert moved > 1e-3, "training must actually change the weights for the comparison to mean anything"
        tolerances.assert_same_weights({adapter.name: ours}, {adapter.name: reference}, weight_tolerance)
        parameters = sum(t.numel() for t in reference.values())
        gradient_norm = max(norm for _, norm in history)
        bound = tolerances.metric(weight_tolerance, parameters, gradient_norm)
        losses = result.losses[adapter.name]
        assert len(losses) == len(history) == adapter.steps
        for step, (loss, (peft_loss, _)) in enumerate(zip(losses, history, strict=True)):
            assert abs(loss - peft_loss) <= bound * max(1.0, abs(peft_loss)), (adapter.name, step, loss, peft_loss)


def test_dora_rslora_and_plain_adapters_trained_together_match_peft_alone(tiny_lm_dir, tmp_path):
    assert_trained_like_peft(tiny_lm_dir, variant_adapters(datasets(tmp_path)), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dora", "rslora", "rsdora"])
def test_each_variant_trained_alone_in_the_fleet_matches_peft(tiny_lm_dir, tmp_path, name):
    adapters = [a for a in variant_adapters(datasets(tmp_path)) if a.name == name]
    assert_trained_like_peft(tiny_lm_dir, adapters, tmp_path)


def test_first_fleet_step_gradients_of_a_mixed_fleet_equal_peft_in_float32(tiny_lm_dir, tmp_path):
    """A and B perturbed (B nonzero, so the DoRA norms differ from the magnitudes): every
    adapter's gradients, magnitude vectors included, from one mixed fleet step."""
    adapters = with_perturbed_inits(tiny_lm_dir, variant_adapters(datasets(tmp_path)), tmp_path)
    ours = fleet_first_step_gradients(tiny_lm_dir, adapters, {}, tmp_path / "fleet")
    layers = 2
    tolerance = tolerances.float32_gradients(layers)
    for adapter in adapters:
        reference = peft_first_step_gradients(tiny_lm_dir, adapter)
        assert ours[adapter.name].keys() == reference.keys()
        for key, gradient in reference.items():
            scale = gradient.abs().max().item()
            assert scale > 0 and math.isfinite(scale), f"{adapter.name} {key}: a zero gradient compares nothing"
            difference = (ours[adapter.name][key] - gradient).abs().max().item()
            assert difference <= tolerance * scale, f"{adapter.name} {key}: {difference / scale:.2e} of the largest"


def test_continuing_an_adapter_as_another_variant_is_a_clear_error(tiny_lm_dir, tmp_path):
    plain = AdapterSpec(name="plain", data=str(datasets(tmp_path)[0]), rank=2, steps=1)
    first = train_fleet(
        FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "first"), adapters=[plain], checkpoint_every=0),
        progress=False,
    )
    continued = dataclasses.replace(plain, variant="dora", init_from=str(first.adapters["plain"]))
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "second"), adapters=[continued], checkpoint_every=0)
    with pytest.raises(ConfigError, match="is a LoRA adapter with use_rslora: False; set variant: lora"):
        train_fleet(spec, progress=False)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_started_from_the_base_trains_beside_plain_ones_as_peft_trains_it_on_its_residual(
    tiny_lm_dir, tmp_path, init
):
    """peft trains a PiSSA / OLoRA adapter on the residual base W - s·B0·A0 and converts it to a
    plain LoRA of twice the rank on save; the fleet keeps W for the plain adapter beside it and
    saves the same converted adapter."""
    data = datasets(tmp_path)
    started = AdapterSpec(name="started", data=str(data[0]), init=init, rank=4, alpha=8, learning_rate=2e-3,
                          micro_batch_size=2, steps=6, target_modules=["q_proj", "down_proj"], seed=1)  # fmt: skip
    plain = AdapterSpec(name="plain", data=str(data[1]), rank=2, alpha=4, learning_rate=5e-3, micro_batch_size=2,
                        steps=6, target_modules=["q_proj", "v_proj"], seed=2)  # fmt: skip
    assert_trained_like_peft(tiny_lm_dir, [started, plain], tmp_path)
    saved = json.loads((tmp_path / "fleet" / "adapters" / "started" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
