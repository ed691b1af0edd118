"""Fleet training on CUDA: bf16 base with fp32 LoRA masters (skipped without a GPU).

Each fast path is held here to its reference on the device itself: the flash varlen kernel to
per-sequence SDPA, the bf16 batched LoRA to peft alone, the step to "never waits for the host",
the memory model to the measured peak.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.config import ALL_PROJECTIONS, AdapterSpec, FleetSpec
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests.conftest import write_image_dataset, write_text_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def qwen2_on_cuda(tmp_path, **dims):
    """A random-weight Qwen2 in bf16 on the GPU, wrapped as a base (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorafleet.models.loading import FrozenBase
    from lorafleet.models.tiny import build_tokenizer

    config = Qwen2Config(tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).requires_grad_(False).eval()
    return FrozenBase(model, build_tokenizer(), None, tmp_path, language_prefix="")


SMALL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000)  # fmt: skip
# Qwen2.5-0.5B's dimensions
HALF_B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936)  # fmt: skip


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


@pytest.mark.parametrize("gqa", [1, 4], ids=["mha", "gqa"])
def test_flash_varlen_equals_per_sequence_attention(gqa):
    """The one-launch varlen kernel against the per-sequence reference, forward and backward."""
    from lorafleet.models import varlen

    class Attention(torch.nn.Module):
        is_causal = True

    lengths = [130, 1, 517, 64, 300]
    total, heads = sum(lengths), 8
    generator = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(1, h, total, 64, device="cuda", generator=generator, dtype=torch.bfloat16)  # noqa: E731
    query, key, value = make(heads), make(heads // gqa), make(heads // gqa)
    offsets = varlen.sequence_offsets(lengths, torch.device("cuda"))
    bounds = offsets["cu_seq_lens_q"].tolist()
    assert varlen._flash_varlen_usable(query), "torch's flash varlen kernel must be available on this GPU"

    def run(fast: bool):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (query, key, value))
        if fast:
            out, _ = varlen.varlen_attention(Attention(), q, k, v, None, **offsets)
        else:
            out, _ = varlen._per_sequence(q, k, v, None, 0.0, bounds)
        out.float().square().sum().backward()
        return out, q.grad, k.grad, v.grad

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert varlen._FLASH_VARLEN["fn"] is not None, "the fast kernel must not have fallen back"


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_fleet_step_never_waits_for_the_device(tmp_path, packing):
    """Forward, backward and the optimizer step run with CUDA's synchronisation check set to error:
    any .item(), boolean-mask index or host read-back inside them fails the test."""
    base = qwen2_on_cuda(tmp_path, **SMALL)
    data = write_text_dataset(tmp_path / "d.jsonl", n=16, seed=0)
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(data), rank=8 * (i + 1), micro_batch_size=2, steps=4, seed=i,
                    target_modules=list(ALL_PROJECTIONS))
        for i in range(3)
    ]  # fmt: skip
    spec = FleetSpec(base="", output=str(tmp_path / "out"), adapters=adapters, checkpoint_every=0, packing=packing)
    trainer = FleetTrainer(spec, base=base, progress=False)
    if packing:
        from lorafleet.models import varlen

        base.model.set_attn_implementation(varlen.register())
        trainer.layout.attention = "varlen"
    trainer._prepare_output(resume=False)
    trainer._admit()
    trainer._step()  # warm: caches, optimizer state
    step = trainer._prepare_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer._forward_backward(step)
        trainer.optimizer.step({job.name: job.learning_rate for job in trainer.active})
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_fleet_matches_peft_alone_within_bf16_tolerance(tiny_lm_dir, tmp_path):
    """The equivalence of tests/train/test_equivalence.py, on the GPU in bf16 with every fast path
    (batched bf16 LoRA, flash attention, fleet AdamW): the fleet's weights land within bf16
    rounding of peft's, measured against how far training moved them."""
    from tests.train.test_equivalence import three_adapters, train_alone_with_peft

    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=13 + 4 * i, seed=i) for i in range(3)]
    adapters = three_adapters(data)
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "fleet"), adapters=adapters,
                     checkpoint_every=0, device="cuda", dtype="bfloat16")  # fmt: skip
    result = train_fleet(spec, progress=False)
    for adapter in adapters:
        ours = load_file(result.adapters[adapter.name] / "adapter_model.safetensors")
        reference = train_alone_with_peft(tiny_lm_dir, adapter, tmp_path, device="cuda", dtype=torch.bfloat16)
        initial = load_file(tmp_path / f"init-{adapter.name}" / "adapter_model.safetensors")
        for key in reference:
            moved = (reference[key] - initial[key]).norm()
            apart = (ours[key] - reference[key]).norm()
            assert moved > 0
            assert apart <= 0.1 * moved, f"{adapter.name} {key}: |fleet - peft| = {apart / moved:.3f} of the movement"


@pytest.mark.parametrize(("seqs", "checkpointing"), [(1, False), (2, False), (4, True)])
def test_memory_prediction_is_within_15_percent_of_the_measured_peak(tmp_path, seqs, checkpointing):
    """On a model of Qwen2.5-0.5B's size, 4 adapters of rank 16 on all projections, 512 tokens."""
    from benchmarks.train_throughput import write_data

    base = qwen2_on_cuda(tmp_path, max_position_embeddings=4096, **HALF_B)
    paths = [write_data(tmp_path, f"a{i}", 16, 512, i) for i in range(4)]
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(path), rank=16, micro_batch_size=seqs, steps=3, seed=i,
                    target_modules=list(ALL_PROJECTIONS))
        for i, path in enumerate(paths)
    ]  # fmt: skip
    spec = FleetSpec(base="", output=str(tmp_path / "out"), adapters=adapters, checkpoint_every=0,
                     activation_checkpointing=checkpointing)  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = FleetTrainer(spec, base=base, progress=False)
    predicted = trainer.admission.predicted_memory(adapters).total
    trainer.run()
    measured = torch.cuda.max_memory_allocated()
    assert 0.85 * measured <= predicted <= 1.15 * measured, (
        f"predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f}"
    )
