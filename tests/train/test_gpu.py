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


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_memory_prediction_bounds_the_measured_peak(tmp_path, checkpointing):
    """On a GPU the prediction must not be below the real peak, nor wildly above it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorafleet.models.loading import BaseModel
    from lorafleet.models.tiny import build_tokenizer
    from lorafleet.train.trainer import FleetTrainer
    from tests.conftest import write_text_dataset

    config = Qwen2Config(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).requires_grad_(False).eval()
    base = BaseModel(model, build_tokenizer(), None, tmp_path, language_prefix="")
    data = write_text_dataset(tmp_path / "d.jsonl", n=16, seed=0)
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(data), rank=16, micro_batch_size=4, steps=3, seed=i) for i in range(4)
    ]
    spec = FleetSpec(base="", output=str(tmp_path / "out"), adapters=adapters, checkpoint_every=0,
                     activation_checkpointing=checkpointing)  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = FleetTrainer(spec, base=base, progress=False)
    predicted = trainer.predicted_memory(adapters).total
    trainer.run()
    measured = torch.cuda.max_memory_allocated()
    assert measured <= predicted <= 3 * measured + 2**30
