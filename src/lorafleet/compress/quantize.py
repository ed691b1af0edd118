"""Weight-only quantization of the language model, saved in the compressed-tensors format.

Three schemes, all symmetric, round-to-nearest, applied to every Linear of the language model
(the vision tower, the projector and the output head stay as they are):

- int8: one scale per output channel (W8A16), a quarter of fp32's bytes;
- int4: one scale per group of 128 inputs (W4A16; a smaller power of two when some layer's width
  is not a multiple of 128: one group size serves the whole model), an eighth of fp32's bytes plus
  the scales;
- fp8: float8 e4m3 weights with one scale per output channel (vLLM's FP8_DYNAMIC scheme, which
  also quantizes activations per token on GPUs that have fp8 kernels).

`QuantizedLinear` keeps the quantized weight in memory and dequantizes it on the fly (smaller,
not faster: there is no low-bit matmul kernel here), so lorafleet's engine and trainer run on the
quantized base and LoRA adapters wrap it like any Linear.

On disk the model is an ordinary HF directory whose `config.json` carries a compressed-tensors
`quantization_config` (pack-quantized for int8/int4, float-quantized for fp8): vLLM serves it
directly, transformers loads it when `compressed-tensors` is installed, and `load_base` reads it
into `QuantizedLinear`s without that library. Weights that are not quantized are stored in
`store_dtype` (bf16 by default, what vLLM's low-bit kernels expect for scales and activations).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lorafleet.errors import ConfigError, ModelLoadError

WEIGHTS_FILE = "model.safetensors"
QUANT_METHOD = "compressed-tensors"
FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass(frozen=True)
class WeightScheme:
    name: str
    bits: int
    kind: str  # "int" or "float"
    group_size: int | None  # inputs sharing a scale; None: the whole row (one scale per output channel)

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.kind == "float" else float(2 ** (self.bits - 1) - 1)

    @property
    def storage_format(self) -> str:
        return "float-quantized" if self.kind == "float" else "pack-quantized"


SCHEMES = {
    "int8": WeightScheme("int8", 8, "int", None),
    "int4": WeightScheme("int4", 4, "int", 128),
    "fp8": WeightScheme("fp8", 8, "float", None),
}
ALIASES = {"w8a16": "int8", "w4a16": "int4"}


def scheme_named(name: str) -> WeightScheme:
    scheme = SCHEMES.get(ALIASES.get(name, name))
    if scheme is None:
        raise ConfigError(f"--quantize {name!r} is not supported; choose one of {', '.join([*SCHEMES, *ALIASES])}")
    return scheme


class QuantizedLinear(nn.Module):
    """Semantics: y = x @ dequantize(weight_q, weight_scale).T + bias, where every run of
    `group` inputs of a row shares one scale. int4 values are stored two per byte, low nibble
    first, offset by 8 (the byte layout of compressed-tensors' int32 packing)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, scheme: WeightScheme, group: int | None, device=None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group = group or in_features  # None: one scale per output channel
        if in_features % self.group or (scheme.bits == 4 and self.group % 2):
            raise ConfigError(f"{scheme.name} groups of {self.group} do not tile a layer {in_features} inputs wide")
        storage = {"int": torch.int8, "float": torch.float8_e4m3fn}[scheme.kind]
        columns = in_features // 2 if scheme.bits == 4 else in_features
        storage = torch.uint8 if scheme.bits == 4 else storage
        self.register_buffer("weight_q", torch.zeros(out_features, columns, dtype=storage, device=device))
        groups = in_features // self.group
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scheme: WeightScheme, group: int | None, scale_dtype: torch.dtype
    ) -> QuantizedLinear:
        bias = linear.bias is not None
        quantized = cls(linear.in_features, linear.out_features, bias, scheme, group, linear.weight.device)
        weight = linear.weight.detach().float()
        grouped = weight.view(linear.out_features, -1, quantized.group)
        # The scale is rounded to the dtype it is stored in before quantizing, so what is saved
        # is exactly what runs here.
        scale = (grouped.abs().amax(dim=2) / scheme.qmax).clamp(min=1e-8).to(scale_dtype).float()
        scaled = (grouped / scale[:, :, None]).view_as(weight)
        if scheme.kind == "float":
            values = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            values = torch.round(scaled).clamp(-scheme.qmax, scheme.qmax).to(torch.int8)
        quantized.set_values(values, scale)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return quantized

    def set_values(self, values: torch.Tensor, scale: torch.Tensor) -> None:
        """Store quantized `values` (out, in: int8 integers, or float8) and their scales (out, groups)."""
        self.weight_q.copy_(_pack_int4(values) if self.scheme.bits == 4 else values)
        self.weight_scale.copy_(scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        values = _unpack_int4(self.weight_q) if self.scheme.bits == 4 else self.weight_q
        grouped = values.to(dtype).view(self.out_features, -1, self.group)
        return (grouped * self.weight_scale.to(dtype)[:, :, None]).view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (in the bias's dtype when there is one, else fp32)."""
        return self.dequantized(self.bias.dtype if self.bias is not None else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, scheme={self.scheme.name}, group={self.group}"


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    unsigned = (values.to(torch.int16) + 8).to(torch.uint8)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1).to(torch.int8) - 8


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
    from transformers.core_model_loading import revert_weight_conversion

    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    schemes = {(m.scheme, m.group if m.scheme.group_size else None) for m in quantized.values()}
    if len(schemes) != 1:  # compressed-tensors describes one scheme (and group size) per config group
        raise ConfigError(f"the quantized layers mix schemes or group sizes {sorted(map(str, schemes))}")
    ((scheme, group),) = schemes
    tied = _tied_keys(model)
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
        "ignore": sorted(_checkpoint_names(model, linears - quantized)),
        "kv_cache_scheme": None,
    }


def is_quantized_checkpoint(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_quantized(model: nn.Module, path: Path, config: dict) -> None:
    """Turn `model`, freshly built from `path`'s config, into the quantized model saved there."""
    scheme, group = _scheme_from_config(config["quantization_config"], path)
    to_model = _checkpoint_to_model_names(model)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(file)
    loaded = {}
    for key, tensor in state.items():
        stem, _, leaf = key.rpartition(".")
        if leaf == "weight_shape":
            continue
        quantized_weight = leaf == "weight_packed" or (leaf == "weight" and tensor.dtype == torch.float8_e4m3fn)
        if not quantized_weight and leaf != "weight_scale":
            loaded[to_model.get(key, key)] = tensor
            continue
        module_name = to_model[f"{stem}.weight"].removesuffix(".weight")
        module = model.get_submodule(module_name)
        if not isinstance(module, QuantizedLinear):
            module = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, scheme, group)
            model.set_submodule(module_name, module)
        if leaf == "weight_scale":
            module.weight_scale.copy_(tensor.float().view_as(module.weight_scale))
        else:
            module.weight_q.copy_(_unpacked(tensor, module))
        loaded[f"{module_name}.weight_q"] = loaded[f"{module_name}.weight_scale"] = None
    model.load_state_dict({k: v for k, v in loaded.items() if v is not None}, strict=False)
    missing = set(model.state_dict()) - set(loaded) - _tied_keys(model)
    if missing:
        raise ModelLoadError(f"{path} lacks weights for {sorted(missing)[:3]}")


def _unpacked(tensor: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
    if module.scheme.kind == "float":
        return tensor
    columns = module.weight_q.shape[1]
    values = tensor.view(torch.uint8)[:, :columns]
    return values if module.scheme.bits == 4 else (values.to(torch.int16) - 128).to(torch.int8)


def _scheme_from_config(quantization_config: dict, path: Path) -> tuple[WeightScheme, int | None]:
    groups = list(quantization_config.get("config_groups", {}).values())
    weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
    for scheme in SCHEMES.values():
        matches = (weights.get("num_bits"), weights.get("type"), weights.get("symmetric")) == (
            scheme.bits,
            scheme.kind,
            True,
        )
        if matches and quantization_config.get("format") == scheme.storage_format:
            return scheme, weights.get("group_size")
    raise ModelLoadError(
        f"{path} is compressed-tensors {quantization_config.get('format')} with {weights or groups}; lorafleet's "
        "engine reads the int8/int4/fp8 weight-only schemes `lorafleet compress` writes. Serve this one with "
        "--engine vllm, or load it with transformers (pip install compressed-tensors)"
    )


def _checkpoint_to_model_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint key → this model's state-dict key (transformers renames some on load, e.g. InternVL's)."""
    from transformers.core_model_loading import revert_weight_conversion

    keys = list(model.state_dict())
    reverted = revert_weight_conversion(model, {key: torch.tensor([i]) for i, key in enumerate(keys)})
    return {checkpoint: keys[int(index)] for checkpoint, index in reverted.items()}


def _checkpoint_names(model: nn.Module, module_names: set[str]) -> set[str]:
    to_model = _checkpoint_to_model_names(model)
    return {
        ckpt.removesuffix(".weight")
        for ckpt, key in to_model.items()
        if key.removesuffix(".weight") in module_names and key.endswith(".weight")
    }


def _tied_keys(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if m is head}
    return {f"{n}.weight" for n in names} if getattr(model.config, "tie_word_embeddings", False) else set()
