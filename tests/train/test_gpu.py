"""The same fleet training on CUDA, bf16 base with fp32 LoRA weights (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_image_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fleet_trains_on_cuda_with_a_bf16_base(tiny_vlm_dir, tmp_path):
    data = [write_image_dataset(tmp_path / f"d{i}.jsonl", n=16, seed=i) for i in range(2)]
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(path), rank=8, learning_rate=3e-3, micro_batch_size=4, steps=30, seed=i)
        for i, path in enumerate(data)
    ]
    spec = FleetSpec(base=str(tiny_vlm_dir), output=str(tmp_path / "out"), adapters=adapters, device="cuda")
    result = train_fleet(spec, progress=False)
    for name, losses in result.losses.items():
        assert sum(losses[-5:]) < sum(losses[:5]), name
        weights = load_file(result.adapters[name] / "adapter_model.safetensors")
        assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
