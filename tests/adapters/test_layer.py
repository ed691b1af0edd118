"""The stacked inference path of the multi-adapter layer is held to its plain reference twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.adapters.layer import MultiLoRALinear, Routing
from lorafleet.adapters.reference import lora_delta_reference
from lorafleet.segments import Segment


def layer_with_adapters(dtype: torch.dtype) -> MultiLoRALinear:
    routing = Routing()
    layer = MultiLoRALinear(nn.Linear(48, 40).to(dtype), routing)
    generator = torch.Generator().manual_seed(0)
    for slot, (name, rank) in enumerate((("a", 8), ("b", 16), ("c", 64)), start=1):
        routing.slots[name] = slot
        layer.add_adapter(name, rank, alpha=2.0 * rank, dropout=0.0, generator=generator, dtype=dtype)
        with torch.no_grad():
            layer.lora_B[name].weight.normal_(0, 0.5, generator=generator)
    routing.slots["elsewhere"] = 4  # an adapter of the fleet that does not target this layer
    routing.slots_version += 1
    return layer


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_stacked_path_matches_the_reference(dtype, tolerance):
    layer = layer_with_adapters(dtype)
    segments = (
        Segment("b", 0, 3),
        Segment(None, 3, 4),
        Segment("a", 4, 5),
        Segment("elsewhere", 5, 7),
        Segment("c", 7, 11),
    )
    layer.routing.segments = segments
    x = torch.randn(11, 5, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = layer.base_layer(x) + lora_delta_reference(x, segments, layer.adapter_weights())
    with torch.no_grad():
        stacked = layer(x)
    torch.testing.assert_close(stacked, expected, rtol=tolerance, atol=tolerance)
    # No adapter: exactly the base's output for that row, from the same batched call (a row computed
    # alone may round differently: BLAS picks its kernel by shape).
    assert torch.equal(stacked[3], layer.base_layer(x)[3])


def test_stacked_weights_follow_in_place_updates():
    layer = layer_with_adapters(torch.float32)
    layer.routing.segments = (Segment("a", 0, 2),)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].weight.mul_(2)  # as an optimizer step would
        after = layer(x)
    delta_before, delta_after = before - layer.base_layer(x), after - layer.base_layer(x)
    torch.testing.assert_close(delta_after, 2 * delta_before)
