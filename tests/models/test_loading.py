"""Local model directories load offline; anything else gets an error that says what to fix."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.errors import ModelLoadError
from lorafleet.models.loading import load_base


def test_tiny_internvl_loads_as_a_frozen_vlm(tiny_vlm_dir):
    base = load_base(tiny_vlm_dir)
    assert type(base.model).__name__ == "InternVLForConditionalGeneration"
    assert base.is_multimodal and base.dtype == torch.float32 and base.image_seq_length == 16
    assert not any(p.requires_grad for p in base.model.parameters())


def test_tiny_qwen2_loads_as_a_causal_lm(tiny_lm_dir):
    base = load_base(tiny_lm_dir, dtype=torch.bfloat16)
    assert type(base.model).__name__ == "Qwen2ForCausalLM"
    assert not base.is_multimodal and base.dtype == torch.bfloat16


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(tmp_path / "no-such-model")


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base(tmp_path)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="BertForMaskedLM.*not supported"):
        load_base(tmp_path)
