"""Quantized weights in memory and the compressed-tensors checkpoints that hold them.

`QuantizedLinear` keeps a weight-only quantized weight (int8 or int4 with per-channel or per-group
scales, or float8 e4m3) in memory and dequantizes it on the fly (smaller, not faster: there is no
low-bit matmul kernel here), so lorafleet's engine and trainer run on a quantized base and LoRA
adapters wrap it like any Linear. `load_quantized` reads the compressed-tensors layout that
`lorafleet compress` writes (compress/quantize.py) — without the compressed-tensors library —
into such modules. It lives here, below adapters, training and serving, because all of them load
quantized bases; only the writing belongs to compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lorafleet.errors import ConfigError, ModelLoadError
from lorafleet.models.hf_compat import revert_weight_conversion

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
        self.weight_q.copy_(pack_int4(values) if self.scheme.bits == 4 else values)
        self.weight_scale.copy_(scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        values = unpack_int4(self.weight_q) if self.scheme.bits == 4 else self.weight_q
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


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    unsigned = (values.to(torch.int16) + 8).to(torch.uint8)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1).to(torch.int8) - 8


def is_quantized_checkpoint(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_quantized(model: nn.Module, path: Path, config: dict) -> None:
    """Turn `model`, freshly built from `path`'s config, into the quantized model saved there."""
    scheme, group = _scheme_from_config(config["quantization_config"], path)
    to_model = checkpoint_to_model_names(model)
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
    missing = set(model.state_dict()) - set(loaded) - tied_keys(model)
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


def checkpoint_to_model_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint key → this model's state-dict key (transformers renames some on load, e.g. InternVL's)."""
    keys = list(model.state_dict())
    reverted = revert_weight_conversion(model, {key: torch.tensor([i]) for i, key in enumerate(keys)})
    return {checkpoint: keys[int(index)] for checkpoint, index in reverted.items()}


def checkpoint_names(model: nn.Module, module_names: set[str]) -> set[str]:
    to_model = checkpoint_to_model_names(model)
    return {
        ckpt.removesuffix(".weight")
        for ckpt, key in to_model.items()
        if key.removesuffix(".weight") in module_names and key.endswith(".weight")
    }


def tied_keys(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if m is head}
    return {f"{n}.weight" for n in names} if getattr(model.config, "tie_word_embeddings", False) else set()
