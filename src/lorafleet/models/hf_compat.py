"""Every use of a transformers internal, in one place, each with its own test.

lorafleet builds on transformers' model definitions but reaches past their public API in a few
places: the decoder without its head, the per-layer gradient-checkpointing hook (set on each of
the decoder layers, which regional compilation walks too), the KV cache a prefill returns, the
attention-function registry, the SDPA attention function, the weight-name conversion of
checkpoints, and the RMSNorm forward of a float64 model. Those change between releases
(`past_key_values` became `cache` in 5.23 and goes away in 5.40), so nothing else imports them:
when a release moves one, this module and tests/models/test_hf_compat.py are what change.
pyproject pins transformers to the releases the suite has passed on.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch
from torch import nn


def inner_model(model: nn.Module) -> nn.Module:
    """The model without its output head: `*ForCausalLM.model`, `InternVLForConditionalGeneration.model`
    (whose forward returns the last hidden state, images merged)."""
    return model.model


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, norm, rotary) below any vision parts."""
    inner = inner_model(model)
    return getattr(inner, "language_model", inner)


def checkpoint_layer(layer: nn.Module) -> None:
    """Recompute `layer` in backward: transformers' `GradientCheckpointingLayer` hook, non-reentrant
    (which keeps the RNG state, so dropout masks are reproduced). The hook only acts on a layer in
    training mode, so that one module is put in it."""
    layer.gradient_checkpointing = True
    layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    layer.training = True


def checkpoint_decoder_layers(language_model: nn.Module) -> None:
    """Recompute every decoder layer in backward (transformers' own checkpointing hook, non-reentrant).
    Only the layers are put in training mode, which that hook requires; the frozen base otherwise
    stays in eval mode. LoRA dropout masks are reproduced exactly (the RNG state is preserved)."""
    for layer in language_model.layers:
        checkpoint_layer(layer)


def compile_decoder_layers(language_model: nn.Module) -> None:
    """Regional compilation: every decoder layer through torch.compile. The layers share their
    code, so one compiled graph serves all of them; a new routing (adapters joining or leaving, a
    new padded length) compiles once more, hence the larger cache."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in language_model.layers:
        layer.compile()


def prefill_with_cache(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run the inner model over `inputs` with a fresh KV cache: the last hidden states, and per
    layer the keys and values (rows, kv_heads, tokens, head_dim)."""
    from transformers import DynamicCache

    inner = inner_model(model)
    keyword = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    output = inner(**inputs, **{keyword: DynamicCache()}, use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    return output.last_hidden_state, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def register_attention(name: str, function: Callable) -> None:
    """Make `attn_implementation=name` known to transformers (no mask function registered with it:
    transformers then builds no mask for it)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention function (the fallback of a custom attention function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def revert_weight_conversion(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict tensors of `model` under the checkpoint's own key names (transformers renames
    some on load, e.g. InternVL's vision tower)."""
    from transformers.core_model_loading import revert_weight_conversion as revert

    return revert(model, tensors)


def norms_in_float64(model: nn.Module) -> None:
    """Make a float64 model's RMSNorms compute in float64. transformers' RMSNorm computes in float32
    and casts back (right for bf16 and fp16), which rounds a float64 model's activations to float32
    at every norm: two float64 runs whose activations differ in the last bits (another batch
    layout, another summation order) then round apart wherever a value falls on both sides of a
    float32 rounding boundary, and AdamW amplifies that into the weights (tests/tolerances.py).
    Models of any other dtype keep transformers' own forward."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        is_rms_norm = type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
        if is_rms_norm and weight is not None and weight.dtype == torch.float64:
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)


def _rms_norm_in_input_dtype(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm (weight * x / sqrt(mean(x^2) + eps)), without the float32 round trip."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return norm.weight * (hidden_states * torch.rsqrt(variance + norm.variance_epsilon))
