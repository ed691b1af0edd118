"""The batched training path of the multi-adapter layer is held to its plain reference twin:
same outputs and same gradients for every adapter, in every layout it takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.adapters import batched
from lorafleet.adapters.layer import MultiLoRALinear, Routing
from lorafleet.adapters.reference import lora_delta_reference
from lorafleet.segments import Segment

RANKS = {"a": 8, "b": 16, "c": 4}


def layer_with_adapters(ranks: dict[str, int], dropout: float = 0.0, alphas: dict | None = None) -> MultiLoRALinear:
    layer = MultiLoRALinear(nn.Linear(48, 40), Routing())
    generator = torch.Generator().manual_seed(0)
    for name, rank in ranks.items():
        alpha = (alphas or {}).get(name, 2.0 * rank)
        layer.add_adapter(name, rank, alpha=alpha, dropout=dropout, generator=generator)
        with torch.no_grad():  # B is zero at initialisation: make the update visible
            layer.lora_B[name].weight.normal_(0, 0.5, generator=generator)
    return layer


def delta_and_grads(layer, x, segments, path):
    adapters = layer.adapter_weights()
    params = [p for w in adapters.values() for p in (w.lora_A.weight, w.lora_B.weight)]
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    delta = path(x, segments, adapters)
    torch.manual_seed(5)
    delta.backward(torch.randn(delta.shape, generator=torch.Generator().manual_seed(2)).to(delta.dtype))
    return delta.detach(), x.grad, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


LAYOUTS = {
    # every adapter one block of equal rows: the batched matmul over adapters
    "equal-blocks": ((Segment("a", 0, 2), Segment("b", 2, 4), Segment("c", 4, 6)), True),
    # unequal micro-batches, a base-only row and an adapter this layer does not carry: dense + row weights
    "mixed": ((Segment("b", 0, 3), Segment(None, 3, 4), Segment("a", 4, 5), Segment("x", 5, 6)), False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_equals_the_reference_in_float32(layout):
    segments, equal = LAYOUTS[layout]
    layer = layer_with_adapters(RANKS, alphas={"a": 16.0, "b": 8.0, "c": 1.0})
    assert batched.plan(segments, layer.adapter_weights()).equal is equal
    x = torch.randn(segments[-1].end, 5, 48, generator=torch.Generator().manual_seed(1))
    ours = delta_and_grads(layer, x, segments, batched.lora_delta_batched)
    reference = delta_and_grads(layer, x, segments, lora_delta_reference)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(ours[2], reference[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_computes_in_bfloat16_with_float32_master_weights(layout):
    segments, _ = LAYOUTS[layout]
    layer = layer_with_adapters(RANKS)
    x = torch.randn(segments[-1].end, 5, 48, generator=torch.Generator().manual_seed(1))
    ours = delta_and_grads(layer, x.bfloat16(), segments, batched.lora_delta_batched)
    reference = delta_and_grads(layer, x, segments, lora_delta_reference)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in ours[2]), "gradients land on the fp32 master weights"
    scale = reference[0].abs().max()
    torch.testing.assert_close(ours[0].float(), reference[0], rtol=0, atol=2e-2 * scale)
    for got, want in zip(ours[2], reference[2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max() + 1e-6)


def test_packed_tokens_route_by_token_through_the_layer():
    """A packed row (one sequence per adapter, lengths differ) goes through the dense layout."""
    layer = layer_with_adapters(RANKS)
    segments = (Segment("a", 0, 7), Segment("c", 7, 10), Segment("b", 10, 16), Segment(None, 16, 20))
    layer.routing.segments, layer.routing.by_token = segments, True
    x = torch.randn(1, 20, 48, generator=torch.Generator().manual_seed(3))
    out = layer(x)
    expected = layer.base_layer(x) + lora_delta_reference(x.reshape(20, 1, 48), segments, layer.adapter_weights()).view(
        1, 20, 40
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 16:], layer.base_layer(x)[0, 16:], rtol=0, atol=0)  # the padding tail


def test_dropout_is_each_adapters_own_and_only_on_the_lora_input():
    layer = layer_with_adapters({"a": 8, "b": 8}, dropout=0.5)
    segments = (Segment("a", 0, 2), Segment("b", 2, 4))
    x = torch.randn(4, 3, 48, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    first = batched.lora_delta_batched(x, segments, layer.adapter_weights())
    torch.manual_seed(1)
    second = batched.lora_delta_batched(x, segments, layer.adapter_weights())
    assert not torch.equal(first, second), "dropout must actually drop"
    for module in layer.lora_dropout.values():
        module.eval()
    torch.testing.assert_close(
        batched.lora_delta_batched(x, segments, layer.adapter_weights()),
        lora_delta_reference(x, segments, layer.adapter_weights()),
        rtol=1e-5,
        atol=1e-5,
    )


def test_row_weights_are_built_once_per_routing_and_shared_by_layers():
    routing = Routing()
    layers = []
    for _ in range(3):
        layer = MultiLoRALinear(nn.Linear(48, 40), routing)
        for name, rank in RANKS.items():
            layer.add_adapter(name, rank, alpha=rank, dropout=0.0)
        layers.append(layer)
    routing.segments = (Segment("a", 0, 1), Segment("b", 1, 3))
    x = torch.randn(3, 2, 48)
    for layer in layers:
        layer(x)
    (entry,) = routing.step_cache.values()
    assert entry[1] is not None and entry[1].shape == (3, 2 * 16)
    routing.segments = (Segment("a", 0, 3),)
    assert routing.step_cache == {}, "new segments, new layouts"
