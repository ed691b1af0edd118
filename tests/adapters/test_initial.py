"""PiSSA and OLoRA starts in a shared-base fleet: the factors peft takes from the base, kept apart
from it so that the base stays exact for every other row, on every path of the layer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafleet.adapters.initial import principal_factors
from lorafleet.adapters.layer import MultiLoRALinear, Routing
from lorafleet.segments import Segment
from tests.adapters.one_projection import OneProjection


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_start_is_peft_own_and_the_base_stays_whole(init):
    torch.manual_seed(0)
    linear = nn.Linear(24, 20)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj"])
    peft_layer = get_peft_model(OneProjection(copy.deepcopy(linear)), config).base_model.model.q_proj
    a0, b0 = principal_factors(linear.weight, 4, 2.0, init)
    torch.testing.assert_close(a0, peft_layer.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(b0, peft_layer.lora_B["default"].weight, rtol=0, atol=0)
    residual = peft_layer.base_layer.weight
    assert (residual - linear.weight).abs().max() > 1e-2, "peft took the directions out of its base"

    layer = MultiLoRALinear(linear, Routing())
    layer.add_adapter("started", 4, 8.0, 0.0, init=init)
    layer.routing.slots["started"] = 1
    assert torch.equal(layer.base_layer.weight, linear.weight), "the fleet's base is never changed"
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    layer.routing.segments = (Segment("started", 0, 3),)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-5)  # s·(BA - B0A0) = 0 at the start
        torch.testing.assert_close(layer(x), peft_layer(x), rtol=0, atol=1e-5)


def test_every_path_sees_the_start_kept_apart():
    """After training moved A and B: the inference path (stacked weights) equals the training path
    for a batch mixing the started adapter with a plain one and the base."""
    torch.manual_seed(0)
    routing = Routing()
    layer = MultiLoRALinear(nn.Linear(24, 20).double(), routing)
    generator = torch.Generator().manual_seed(2)
    for slot, (name, init) in enumerate((("started", "pissa"), ("plain", "kaiming")), start=1):
        routing.slots[name] = slot
        layer.add_adapter(name, 4, 8.0, 0.0, generator, torch.float64, init=init)
        with torch.no_grad():
            layer.lora_B[name].weight.add_(torch.randn(20, 4, generator=generator, dtype=torch.float64) * 0.1)
    routing.slots_version += 1
    routing.segments = (Segment("plain", 0, 2), Segment(None, 2, 3), Segment("started", 3, 6))
    x = torch.randn(6, 5, 24, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x).detach()
    torch.testing.assert_close(inference, training, rtol=0, atol=1e-12)
    assert (training[3:] - layer.base_layer(x[3:])).abs().max() > 1e-3


def test_a_gaussian_start_draws_a_with_std_one_over_rank_as_peft_does():
    layer = MultiLoRALinear(nn.Linear(4096, 16), Routing())
    layer.add_adapter("g", 8, 16.0, 0.0, torch.Generator().manual_seed(0), init="gaussian")
    a = layer.lora_A["g"].weight
    # 32768 draws: the sample std is within a few times 1 / sqrt(2 n) = 0.4% of 1/8
    assert abs(a.std().item() * 8 - 1) < 0.02 and abs(a.mean().item()) < 0.01
    assert not layer.lora_B["g"].weight.any()
