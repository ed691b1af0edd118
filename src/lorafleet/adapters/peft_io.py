"""Adapters on disk are PEFT adapter directories, in both directions.

We write `adapter_config.json` with peft's own `LoraConfig` and the weights as
`adapter_model.safetensors` under peft's key names (`base_model.model.<module>.lora_A.weight`,
and for DoRA `base_model.model.<module>.lora_magnitude_vector`), with `use_rslora` and `use_dora`
in the config, so `peft.PeftModel.from_pretrained(base, dir)` loads them as they are (and vLLM the
plain LoRA and rsLoRA ones); and we read any peft LoRA directory that uses features our layer
implements.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape
from lorafleet.adapters.initial import converted_alpha
from lorafleet.errors import AdapterError

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_magnitude_vector)$")


def peft_target_modules(modules: tuple[str, ...], language_prefix: str) -> list[str] | str:
    """The `target_modules` peft needs to wrap exactly `modules` and nothing else.

    For a causal LM the short names suffice; below a VLM's language model a regex keeps peft off
    the vision tower, whose attention has the same projection names.
    """
    short_names = sorted({name.rsplit(".", 1)[-1] for name in modules})
    if not language_prefix:
        return short_names
    return re.escape(language_prefix) + r".*\.(?:" + "|".join(map(re.escape, short_names)) + ")"


TRAINING_FILE = "lorafleet.json"  # beside the PEFT files: how the adapter's inputs were prepared


def save_adapter(
    fleet: LoRAFleet, name: str, out_dir: str | Path, base_path: str | Path, training: dict | None = None
) -> Path:
    """Write adapter `name` as a PEFT LoRA directory (a PiSSA / OLoRA adapter as the plain LoRA of
    twice its rank that peft's conversion writes); `training` (e.g. the image tiling it was
    trained with) goes to lorafleet.json, for the server to prepare requests the same way."""
    from peft import LoraConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = fleet.shapes[name]
    converted = shape.saved_rank != shape.rank  # PiSSA / OLoRA, saved as peft converts them
    config = LoraConfig(
        r=shape.saved_rank,
        lora_alpha=converted_alpha(shape.alpha, shape.use_rslora) if converted else shape.alpha,
        lora_dropout=shape.dropout,
        use_rslora=shape.use_rslora,
        use_dora=shape.use_dora,
        target_modules=peft_target_modules(shape.modules, fleet.language_prefix),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_path),
    )
    config.save_pretrained(out_dir)
    tensors = {peft_key(key): weight.detach().to("cpu").contiguous() for key, weight in fleet.saved_weights(name)}
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    if training is not None:
        (out_dir / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")
    return out_dir


def peft_key(key: str) -> str:
    """peft's file key of a `LoRAFleet.named_weights` key: lora_A/lora_B matrices end in .weight,
    DoRA's magnitude vector does not."""
    return f"{PEFT_PREFIX}{key}" if key.endswith(".lora_magnitude_vector") else f"{PEFT_PREFIX}{key}.weight"


def training_settings(adapter_dir: str | Path) -> dict:
    """What lorafleet.json recorded about the adapter's training ({} for any other PEFT adapter)."""
    path = Path(adapter_dir) / TRAINING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_adapter(adapter_dir: str | Path) -> tuple[LoRAShape, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA directory: its shape and its weights keyed `module.lora_A|lora_B`."""
    from peft import LoraConfig

    adapter_dir = Path(adapter_dir)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").exists() or not weights_file.exists():
        raise AdapterError(
            f"{adapter_dir} is not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)"
        )
    config = LoraConfig.from_pretrained(str(adapter_dir))
    unsupported = {
        "modules_to_save": config.modules_to_save,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
    }
    used = [key for key, value in unsupported.items() if value]
    if used or config.bias != "none":
        raise AdapterError(f"{adapter_dir}: adapter uses {used or ['bias']}, which lorafleet does not support yet")
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower().startswith(("pissa", "olora")):
        raise AdapterError(
            f"{adapter_dir}: init_lora_weights {config.init_lora_weights!r} means the adapter expects a base whose "
            "weights it changed; convert it to a plain LoRA as peft saves it (path_initial_model_for_weight_conversion)"
        )
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(weights_file).items():
        match = _KEY.match(key) or (_MAGNITUDE_KEY.match(key) if config.use_dora else None)
        if match is None:
            raise AdapterError(f"{weights_file}: unexpected tensor {key!r} in a LoRA adapter")
        weights[f"{match['module']}.{match['which']}"] = tensor
    modules = tuple(sorted({key.rsplit(".", 1)[0] for key in weights}))
    if config.use_dora:
        missing = [m for m in modules if f"{m}.lora_magnitude_vector" not in weights]
        if missing:
            raise AdapterError(f"{weights_file}: use_dora is set but {missing[0]!r} has no lora_magnitude_vector")
    shape = LoRAShape(
        rank=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        modules=modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    return shape, weights


def load_adapter(fleet: LoRAFleet, name: str, adapter_dir: str | Path, dtype: torch.dtype = torch.float32) -> LoRAShape:
    """Attach the PEFT adapter in `adapter_dir` to the fleet under `name`, its weights in `dtype`."""
    shape, weights = read_adapter(adapter_dir)
    broken = sorted(key for key, tensor in weights.items() if not torch.isfinite(tensor).all())
    if broken:  # served beside others, one NaN adapter would poison every row of the batch
        raise AdapterError(f"{adapter_dir}: weights {broken[0]!r} (and {len(broken) - 1} more) are not finite")
    missing = [m for m in shape.modules if not _has_module(fleet, m)]
    if missing:
        raise AdapterError(
            f"{adapter_dir}: the base model has no module {missing[0]!r}; was it trained on another base?"
        )
    fleet.add_adapter(name, shape, dtype=dtype)
    copy_weights(fleet, name, weights)
    return shape


def copy_weights(fleet: LoRAFleet, name: str, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, param in fleet.named_weights(name):
            source = weights[key]
            if source.shape != param.shape:
                raise AdapterError(
                    f"adapter {name!r}: {key} has shape {tuple(source.shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(source.to(param.dtype))


def _has_module(fleet: LoRAFleet, module_name: str) -> bool:
    try:
        fleet.model.get_submodule(module_name)
    except AttributeError:
        return False
    return True
