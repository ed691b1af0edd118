"""Weight-only int8 quantization of the language model, for lorafleet's own engine and trainer.

Each Linear of the language model keeps its weight as int8 with one fp32 scale per output channel
(symmetric, absmax / 127) and dequantizes on the fly: a quarter of the bytes of fp32, half of
bf16. The vision tower, the projector and the output head stay as they are. LoRA adapters wrap
`Int8Linear` like any Linear, so a fleet trains and serves on a quantized base.

On disk a quantized model is its config plus `quantized.safetensors` and `quantization.json`, and
deliberately no `model.safetensors`: transformers, which does not know this format, then refuses
the directory instead of loading int8 numbers as if they were weights. `load_base` reads it.
For vLLM, the compressed-tensors export (llm-compressor) is the route; it is not implemented here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "quantized.safetensors"
METHOD = "int8-weight-only"


class Int8Linear(nn.Module):
    """Semantics: y = x @ (weight_int8 * weight_scale[:, None]).T + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device)
        quantized.weight_int8.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        quantized.weight_scale.copy_(scale)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return quantized

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (in the bias's dtype when there is one, else fp32)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return (self.weight_int8.to(dtype) * self.weight_scale[:, None].to(dtype)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale[:, None].to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def quantize_int8(language_model: nn.Module) -> list[str]:
    """Replace every Linear below `language_model` by an Int8Linear; returns their names."""
    names = [name for name, module in language_model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child)))
    return names


def save_quantized(model: nn.Module, prefix: str, names: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tied = _tied_keys(model)  # stored once, as the input embedding
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / QUANTIZATION_FILE).write_text(json.dumps({"method": METHOD, "prefix": prefix, "modules": names}, indent=2))
    (out / "model.safetensors").unlink(missing_ok=True)


def load_quantized(model: nn.Module, path: Path) -> None:
    """Turn a freshly built `model` into the quantized model saved at `path`."""
    spec = json.loads((path / QUANTIZATION_FILE).read_text())
    language_model = model.get_submodule(spec["prefix"]) if spec["prefix"] else model
    for name in spec["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))
    state = load_file(path / WEIGHTS_FILE)
    model.load_state_dict(state, strict=False)  # tied output weights are stored once
    missing = set(model.state_dict()) - set(state) - _tied_keys(model)
    if missing:
        raise KeyError(f"{path / WEIGHTS_FILE} lacks {sorted(missing)[:3]}")


def _tied_keys(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if m is head}
    return {f"{n}.weight" for n in names} if getattr(model.config, "tie_word_embeddings", False) else set()
