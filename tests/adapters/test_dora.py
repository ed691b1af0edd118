"""DoRA and rsLoRA in the multi-adapter layer, held to peft's own layer in float64: outputs and the
gradients of A, B, the magnitude vector and the input, each adapter alone and mixed in one batch
with plain LoRA rows and base rows."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lorafleet.adapters import dora
from lorafleet.adapters.layer import MultiLoRALinear, Routing
from lorafleet.errors import AdapterError
from lorafleet.segments import Segment
from tests import tolerances
from tests.adapters.one_projection import OneProjection

# name: (rank, alpha, use_rslora, use_dora)
ADAPTERS = {"plain": (4, 8.0, False, False), "rs": (8, 16.0, True, False), "dora": (4, 8.0, False, True),
            "rsdora": (16, 8.0, True, True)}  # fmt: skip
MIXED = (Segment("dora", 0, 2), Segment("plain", 2, 3), Segment(None, 3, 4), Segment("rsdora", 4, 7),
         Segment("rs", 7, 8))  # fmt: skip


def base_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(24, 20, bias=True).double()


def our_layer() -> MultiLoRALinear:
    layer = MultiLoRALinear(base_linear(), Routing())
    generator = torch.Generator().manual_seed(1)
    for name, (rank, alpha, rslora, use_dora) in ADAPTERS.items():
        layer.add_adapter(name, rank, alpha, 0.0, generator, torch.float64, rslora, use_dora)
        with torch.no_grad():  # B is zero and m = ||W|| at initialisation: make both matter
            layer.lora_B[name].weight.normal_(0, 0.3, generator=generator)
            if use_dora:
                layer.lora_magnitude_vector[name].weight.mul_(1 + 0.2 * torch.rand(20, generator=generator).double())
    return layer


def peft_twin(layer: MultiLoRALinear, name: str) -> nn.Module:
    """peft's model of one adapter, with our layer's weights."""
    rank, alpha, rslora, use_dora = ADAPTERS[name]
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, use_dora=use_dora, target_modules=["q_proj"])
    model = get_peft_model(OneProjection(copy.deepcopy(layer.base_layer)), config)
    peft_layer = model.base_model.model.q_proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A[name].weight)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B[name].weight)
        if use_dora:
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector[name].weight)
    return model.double()


def outputs_and_gradients(forward, x: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    out = forward(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights).sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in params)]


def adapter_params(module: nn.Module, name: str) -> list[torch.Tensor]:
    tables = ("lora_A", "lora_B", "lora_magnitude_vector")
    return [getattr(module, table)[name].weight for table in tables if name in getattr(module, table)]


def test_the_norm_without_the_sum_equals_peft_norm_of_the_sum_in_float64():
    layer = our_layer()
    weight = layer.base_layer.weight
    weights = [layer.adapter_weights()[name] for name in ("dora", "rsdora", "rs")]  # ranks 4, 16, 8
    ours = dora.weight_norms(weight, dora.row_norms_squared(weight, torch.float64), weights)
    for norms, adapter in zip(ours, weights, strict=True):
        reference = dora.weight_norm_reference(weight, adapter)
        # one sum of `in` products per term: float64 rounding, far below a real difference
        assert (norms - reference).abs().max().item() <= tolerances.GRADIENT_ROUNDING * reference.max().item()


@pytest.mark.parametrize("layout", ["alone", "mixed"])
def test_dora_and_rslora_rows_equal_peft_outputs_and_gradients_in_float64(layout):
    layer = our_layer()
    x = torch.randn(8, 5, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    segments = MIXED if layout == "mixed" else (Segment("rsdora", 0, 8),)
    layer.routing.segments = segments
    ours = outputs_and_gradients(layer, x, [p for n in ADAPTERS for p in adapter_params(layer, n)])
    out, grad_x, grads = ours[0], ours[1], iter(ours[2:])
    grads = {name: [next(grads) for _ in adapter_params(layer, name)] for name in ADAPTERS}
    for segment in segments:
        rows = slice(segment.start, segment.end)
        if segment.adapter is None:
            expected = layer.base_layer(x[rows])
            torch.testing.assert_close(out[rows], expected, rtol=0, atol=tolerances.GRADIENT_ROUNDING)
            continue
        twin = peft_twin(layer, segment.adapter)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)[rows]
        params = adapter_params(twin.base_model.model.q_proj, "default")
        inputs = x[rows].clone().requires_grad_(True)
        for p in params:
            p.grad = None
        peft_out = twin(inputs)
        (peft_out * weights).sum().backward()
        bound = tolerances.GRADIENT_ROUNDING * max(1.0, peft_out.abs().max().item())
        torch.testing.assert_close(out[rows], peft_out.detach(), rtol=0, atol=bound)
        torch.testing.assert_close(grad_x[rows], inputs.grad, rtol=0, atol=bound * 10)
        for got, want in zip(grads[segment.adapter], [p.grad for p in params], strict=True):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got, want, rtol=0, atol=tolerances.GRADIENT_ROUNDING * 10 * scale)
    assert (out - layer.base_layer(x)).abs().max() > 1e-2, "the adapters must change the output"


def test_inference_path_keeps_dora_scales_until_a_weight_changes():
    layer = our_layer()
    layer.routing.slots.update({name: slot for slot, name in enumerate(ADAPTERS, start=1)})
    layer.routing.slots_version += 1
    layer.routing.segments = MIXED
    x = torch.randn(8, 3, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
    with torch.enable_grad():
        training_path = layer(x).detach()
    torch.testing.assert_close(first, training_path, rtol=0, atol=1e-12)
    with torch.no_grad():
        layer.lora_B["dora"].weight.mul_(2)
        changed = layer(x)
    assert (changed[:2] - first[:2]).abs().max() > 1e-3, "a changed B must change the cached norm"
    torch.testing.assert_close(changed[2:], first[2:], rtol=0, atol=0)


def test_dora_training_with_dropout_is_a_clear_error():
    layer = MultiLoRALinear(base_linear(), Routing())
    layer.add_adapter("d", 4, 8.0, 0.1, dtype=torch.float64, use_dora=True)
    layer.routing.segments = (Segment("d", 0, 2),)
    with pytest.raises(AdapterError, match="'d' has dropout.*dropout: 0"):
        layer(torch.randn(2, 24, dtype=torch.float64))


def test_dora_on_a_quantized_projection_is_a_clear_error():
    from lorafleet.models.quantized import QuantizedLinear, scheme_named

    quantized = QuantizedLinear.from_linear(nn.Linear(32, 16), scheme_named("int8"), None, torch.float32)
    layer = MultiLoRALinear(quantized, Routing())
    with pytest.raises(AdapterError, match="QuantizedLinear.*unquantized base"):
        layer.add_adapter("d", 4, 8.0, 0.0, use_dora=True)
