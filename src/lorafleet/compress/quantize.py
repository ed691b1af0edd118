"""Weight-only quantization of the language model, saved in the compressed-tensors format.

Three schemes, all symmetric, round-to-nearest, applied to every Linear of the language model
(the vision tower, the projector and the output head stay as they are):

- int8: one scale per output channel (W8A16), a quarter of fp32's bytes;
- int4: one scale per group of 128 inputs (W4A16; a smaller power of two when some layer's width
  is not a multiple of 128: one group size serves the whole model), an eighth of fp32's bytes plus
  the scales;
- fp8: float8 e4m3 weights with one scale per output channel (vLLM's FP8_DYNAMIC scheme, which
  also quantizes activations per token on GPUs that have fp8 kernels).

`QuantizedLinear` (models/quantized.py, with the reader) keeps the quantized weight in memory and
dequantizes it on the fly, so lorafleet's engine and trainer run on the quantized base and LoRA
adapters wrap it like any Linear. This module writes.

On disk the model is an ordinary HF directory whose `config.json` carries a compressed-tensors
`quantization_config` (pack-quantized for int8/int4, float-quantized for fp8): vLLM serves it
directly, transformers loads it when `compressed-tensors` is installed, and `load_base` reads it
into `QuantizedLinear`s without that library. Weights that are not quantized are stored in
`store_dtype` (bf16 by default, what vLLM's low-bit kernels expect for scales and activations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lorafleet.errors import ConfigError
from lorafleet.models.hf_compat import revert_weight_conversion
from lorafleet.models.quantized import (
    QUANT_METHOD,
    WEIGHTS_FILE,
    QuantizedLinear,
    WeightScheme,
    checkpoint_names,
    tied_keys,
)


def linear_names(language_model: nn.Module) -> list[str]:
    """The Linears that quantization replaces: every one below the language model."""
    return [name for name, module in language_model.named_modules() if type(module) is nn.Linear]


def model_group_size(language_model: nn.Module, scheme: WeightScheme) -> int | None:
    """One group size for the whole model (compressed-tensors has one per scheme): the scheme's,
    or the largest power-of-two divisor of every layer's input width below it; None: per channel."""
    if scheme.group_size is None:
        return None
    widths = (language_model.get_submodule(n).in_features for n in linear_names(language_model))
    group = math.gcd(scheme.group_size, *widths)
    if group < 8:
        raise ConfigError(f"{scheme.name} needs layer widths that are multiples of 8; groups would be {group} wide")
    return group


def quantize_language_model(
    language_model: nn.Module, scheme: WeightScheme, scale_dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """Replace every Linear below `language_model` by a QuantizedLinear rounded to nearest;
    returns their names. (GPTQ: `compress.gptq.gptq_language_model`.)"""
    names = linear_names(language_model)
    group = model_group_size(language_model, scheme)
    for name in names:
        linear = language_model.get_submodule(name)
        language_model.set_submodule(name, QuantizedLinear.from_linear(linear, scheme, group, scale_dtype))
    return names


def round_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point parameter and buffer to `dtype` and back, in place: the model
    then computes exactly what it will compute after being saved in `dtype` and reloaded."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():  # what is saved: no rotary tables
            if tensor.is_floating_point() and not name.endswith("weight_scale") and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def save_quantized(model: nn.Module, out: Path, store_dtype: torch.dtype) -> None:
    """Write `model` (with QuantizedLinears in it) as a compressed-tensors HF directory."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    schemes = {(m.scheme, m.group if m.scheme.group_size else None) for m in quantized.values()}
    if len(schemes) != 1:  # compressed-tensors describes one scheme (and group size) per config group
        raise ConfigError(f"the quantized layers mix schemes or group sizes {sorted(map(str, schemes))}")
    ((scheme, group),) = schemes
    tied = tied_keys(model)
    tensors = {}
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if key in tied:
            continue  # stored once, as the input embedding
        if module_name in quantized and leaf in ("weight_q", "weight_scale"):
            tensors.update(_stored_tensors(module_name, quantized[module_name], leaf, store_dtype))
        elif tensor.is_floating_point():
            tensors[key] = tensor.detach().to(store_dtype)
        else:
            tensors[key] = tensor.detach()
    tensors = revert_weight_conversion(model, tensors)  # the checkpoint's own key layout
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, out / WEIGHTS_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = _quantization_config(scheme, group, model, set(quantized))
    config["dtype"] = str(store_dtype).removeprefix("torch.")
    for sub in ("text_config", "vision_config"):
        if sub in config:
            config[sub]["dtype"] = config["dtype"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _stored_tensors(name: str, module: QuantizedLinear, leaf: str, store_dtype: torch.dtype) -> dict:
    """compressed-tensors' names and layouts for one quantized Linear."""
    if leaf == "weight_scale":
        return {f"{name}.weight_scale": module.weight_scale.to(store_dtype)}
    if module.scheme.kind == "float":
        return {f"{name}.weight": module.weight_q}
    values = module.weight_q if module.scheme.bits == 4 else (module.weight_q.to(torch.int16) + 128).to(torch.uint8)
    return {
        # int32 words holding 32/bits values each, first value in the lowest bits (little-endian bytes)
        f"{name}.weight_packed": _padded_to_words(values).view(torch.int32),
        f"{name}.weight_shape": torch.tensor([module.out_features, module.in_features]),
    }


def _padded_to_words(values: torch.Tensor) -> torch.Tensor:
    extra = -values.shape[1] % 4
    return F.pad(values, (0, extra)) if extra else values.contiguous()


def _quantization_config(scheme: WeightScheme, group: int | None, model: nn.Module, quantized: set[str]) -> dict:
    weights = {"num_bits": scheme.bits, "type": scheme.kind, "symmetric": True, "dynamic": False}
    if scheme.bits == 4:
        weights |= {"strategy": "group", "group_size": group}
    else:
        weights |= {"strategy": "channel"}
    activations = None
    if scheme.kind == "float":  # vLLM's FP8_DYNAMIC: activations quantized per token at run time
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear | QuantizedLinear)}
    return {
        "quant_method": QUANT_METHOD,
        "format": scheme.storage_format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
            }
        },
        # every Linear that is not quantized, by name (vision tower, projector, output head)
        "ignore": sorted(checkpoint_names(model, linears - quantized)),
        "kv_cache_scheme": None,
    }
