"""Load a frozen base model from a local Hugging Face directory, offline.

Two families are supported: InternVL in the `-hf` layout (`InternVLForConditionalGeneration` with
its processor) and any transformers causal LM (Qwen2/2.5/3, Llama, ...). The base is frozen and in
eval mode; its dtype defaults to bf16 on CUDA and fp32 on CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafleet.errors import ModelLoadError
from lorafleet.models import hf_compat

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is a local directory, never a hub id

INTERNVL_ARCHITECTURE = "InternVLForConditionalGeneration"


@dataclass
class FrozenBase:
    """A frozen base with what is needed to feed it: tokenizer and, for a VLM, the image processor."""

    model: nn.Module
    tokenizer: object
    image_processor: object | None
    path: Path
    # Module-name prefix of the language model: LoRA targets are looked up below it, so that the
    # vision tower's q/k/v projections are never adapted by accident.
    language_prefix: str
    image_seq_length: int = 0
    image_token: str = ""

    @property
    def is_multimodal(self) -> bool:
        return self.image_processor is not None

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, norm, rotary) below any vision parts."""
        return hf_compat.language_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def read_model_config(path: Path) -> dict:
    """Read `config.json`, with errors that say what the directory is missing."""
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist: pass a local model directory")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json); "
            "lorafleet loads local checkpoints only, e.g. a snapshot of OpenGVLab/InternVL3-1B-hf"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file} is not valid JSON: {err}") from err


def load_base(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    weights: bool = True,
    quantize: str | None = None,
    attention: str | None = None,
) -> FrozenBase:
    """Load the model at `path`, frozen, with its tokenizer (and image processor for a VLM).
    `weights=False` builds the model on the meta device instead: shapes and data handling without
    reading or allocating any weight (for planning). `quantize="nf4"` loads the language model's
    Linear layers as 4-bit NormalFloat with bitsandbytes (QLoRA); the vision tower, projector and
    output head stay in `dtype`."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    path = Path(path)
    config = read_model_config(path)
    architectures = config.get("architectures") or []
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs = dict(dtype=dtype, local_files_only=True, weights=weights)
    if quantize is not None and weights:
        kwargs |= {"quantization_config": _nf4_config(dtype), "device_map": str(device)}
    if attention == "varlen":
        from lorafleet.models import varlen

        attention = varlen.register()
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if INTERNVL_ARCHITECTURE in architectures:
        model = _from_pretrained(AutoModelForImageTextToText, path, config, kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        _use_processor_template(processor)
        base = FrozenBase(
            model=model,
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
            path=path,
            language_prefix="model.language_model.",
            image_seq_length=processor.image_seq_length,
            image_token=processor.image_token,
        )
    elif any(name.endswith("ForCausalLM") for name in architectures):
        try:
            model = _from_pretrained(AutoModelForCausalLM, path, config, kwargs)
        except ValueError as err:
            raise ModelLoadError(f"{path}: transformers cannot build {architectures}: {err}") from err
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        base = FrozenBase(model, tokenizer, None, path, language_prefix="")
    else:
        raise ModelLoadError(
            f"{path}: architecture {architectures or '(none)'} is not supported; lorafleet loads "
            f"{INTERNVL_ARCHITECTURE} (InternVL -hf layout) or a transformers *ForCausalLM"
        )
    if base.tokenizer.pad_token is None:
        base.tokenizer.pad_token = base.tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    hf_compat.norms_in_float64(model)  # a float64 model stays float64 through its norms (no-op for other dtypes)
    if weights and quantize is None:
        model.to(device)  # a bitsandbytes model is placed by device_map and refuses .to()
    return base


def _nf4_config(dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelLoadError("quantize_base: nf4 needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # matched from the start of module names, as regexes: the vision tower, projector and head stay
        llm_int8_skip_modules=[r".*vision_tower", r".*multi_modal_projector", "lm_head"],
    )


def _use_processor_template(processor) -> None:
    """A VLM's conversation format is its processor's chat template (what `processor.apply_chat_template`
    renders). Checkpoints saved by older transformers keep it in chat_template.json while
    tokenizer_config.json still holds the language model's own template (Qwen2.5's, with its
    default system prompt), and lorafleet renders through the tokenizer: make them one."""
    template = processor.chat_template
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if isinstance(template, str) and template:
        processor.tokenizer.chat_template = template


def _from_pretrained(auto_class, path: Path, config: dict, kwargs: dict) -> nn.Module:
    """transformers' loader, or ours for a compressed-tensors checkpoint (`lorafleet compress
    --quantize`): its weights stay quantized in memory and compressed-tensors is not needed."""
    from transformers import AutoConfig

    from lorafleet.models.quantized import is_quantized_checkpoint, load_quantized

    load_weights = kwargs.pop("weights")
    if load_weights and not is_quantized_checkpoint(config):
        return auto_class.from_pretrained(path, **kwargs)
    model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config  # layers are swapped by load_quantized, not by transformers
    build = dict(dtype=kwargs["dtype"], attn_implementation=kwargs.get("attn_implementation"))
    if not load_weights:
        with torch.device("meta"):
            return auto_class.from_config(model_config, **build)
    model = auto_class.from_config(model_config, **build)
    load_quantized(model, path, config)
    return model
