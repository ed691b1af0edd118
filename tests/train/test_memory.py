"""The memory model against what autograd really keeps, admission under a budget, `lorafleet plan`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.config import ALL_PROJECTIONS, AdapterSpec, FleetSpec
from lorafleet.models.attention import training_attention
from lorafleet.models.hf_compat import checkpoint_decoder_layers
from lorafleet.segments import Segment
from lorafleet.train import memory
from lorafleet.train.loss import chunked_segment_losses
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset
from tests.train.test_loss import saved_bytes


def small_model_with_adapters(rank: int, adapters: int, dtype: torch.dtype = torch.float32, dora: int = 0):
    """A three-layer Qwen2 with `adapters` LoRA adapters on every projection, the first `dora` of them DoRA."""
    config = Qwen2Config(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, attn_implementation="sdpa",
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False).to(dtype)
    fleet = LoRAFleet(model, "")
    targets = find_target_modules(model, "", list(ALL_PROJECTIONS))
    for index in range(adapters):
        shape = LoRAShape(rank, 2 * rank, 0.0, targets, use_dora=index < dora)
        fleet.add_adapter(f"a{index}", shape, seed=index)
    return model, fleet, targets


@pytest.mark.parametrize("dora", [0, 2], ids=["lora", "half-dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_predicted_activations_match_what_autograd_keeps(checkpointing, dtype, dora):
    """Everything autograd keeps in a fleet step (the base's own weights aside: they are resident
    anyway) against the activation and adapter-copy terms of the prediction; with DoRA adapters
    in the step too."""
    rank, rows, length = 16, 4, 256
    model, fleet, targets = small_model_with_adapters(rank, rows, dtype, dora)
    if checkpointing:
        checkpoint_decoder_layers(model.model)
    ids = torch.randint(0, 1024, (rows, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length * 3 // 4] = -100
    segments = [Segment(f"a{i}", i, i + 1) for i in range(rows)]

    def step():
        with fleet.route(segments), training_attention():  # as the trainer runs it: causal, no mask
            hidden = model.model(input_ids=ids).last_hidden_state
            chunked_segment_losses(hidden, model.lm_head, labels, segments)

    resident = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = saved_bytes(step, exclude=resident)
    shape = memory.model_shape(model)
    parameters = memory.lora_parameters(model, targets, rank)
    outputs = memory.output_features(model, targets)
    loads = [memory.AdapterLoad(f"a{i}", rank, parameters, 1, length, outputs if i < dora else 0) for i in range(rows)]
    size = dtype.itemsize
    predicted = memory.estimate(shape, loads, dtype_bytes=size, activation_checkpointing=checkpointing)
    copies = rows * parameters * size  # the compute-dtype adapter weights the batched path keeps
    tokens = rows * length
    if checkpointing:  # forward keeps each layer's input (and the final norm's fp32 input); one
        # layer's worth is recomputed in backward
        kept = tokens * shape.hidden * (shape.layers * size + 4)
        assert kept <= measured <= 1.5 * kept
        assert measured <= predicted.activations
    else:
        assert 0.9 * measured <= predicted.activations + copies <= 1.1 * measured


def test_lora_parameter_count_matches_the_adapter():
    model, fleet, targets = small_model_with_adapters(rank=8, adapters=2, dora=1)
    assert memory.lora_parameters(model, targets, 8) == sum(p.numel() for p in fleet.parameters("a1"))
    assert memory.lora_parameters(model, targets, 8, dora=True) == sum(p.numel() for p in fleet.parameters("a0"))


def fleet_spec(base, tmp_path, data, **options):
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(data), rank=4, steps=4, learning_rate=1e-2, micro_batch_size=2, seed=i)
        for i in range(3)
    ]
    # float64: the runs are compared with each other (tests/tolerances.py)
    settings = dict(checkpoint_every=0, dtype="float64") | options
    return FleetSpec(base=str(base), output=str(tmp_path), adapters=adapters, **settings)


def test_admission_keeps_the_predicted_peak_within_the_budget(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    probe = FleetTrainer(fleet_spec(tiny_lm_dir, tmp_path / "probe", data), progress=False)
    two = probe.admission.predicted_memory(probe.spec.adapters[:2]).total
    three = probe.admission.predicted_memory(probe.spec.adapters).total
    assert two < three
    budget_gb = (two + three) / 2 / memory.GIB

    spec = fleet_spec(tiny_lm_dir, tmp_path / "tight", data, memory_budget_gb=budget_gb)
    trainer = FleetTrainer(spec, progress=False)
    running = []
    trainer.on_step = lambda _: running.append(len(trainer.active))
    limited = trainer.run()
    assert max(running) == 2 and sorted(limited.adapters) == ["a0", "a1", "a2"]

    free = train_fleet(fleet_spec(tiny_lm_dir, tmp_path / "free", data), progress=False)
    # who trains alongside whom never changes an adapter
    ours, reference = ({name: load_file(path / "adapter_model.safetensors") for name, path in run.adapters.items()}
                       for run in (limited, free))  # fmt: skip
    tolerances.assert_same_weights(ours, reference, tolerances.fleet_weights(spec.adapters))


@pytest.mark.slow
def test_plan_command_reports_per_adapter_and_how_many_fit(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        f"base: {tiny_lm_dir}\noutput: {tmp_path / 'out'}\nadapters:\n"
        + "".join(f"  - {{name: a{i}, data: {data}, rank: {4 * (i + 1)}}}\n" for i in range(3))
    )
    run = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "plan", str(fleet), "--budget-gb", "0.55"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert all(f"a{i}" in run.stdout for i in range(3))
    assert "budget 0.55 GiB: fits" in run.stdout
    fit = int(run.stdout.split("adapters like the largest one that fit at once:")[1].split()[0])
    assert fit >= 3
    assert "GPUs for every adapter at once: adapter 1, data 1" in run.stdout
    assert not (tmp_path / "out").exists()  # planning trains nothing and writes nothing


def test_plan_counts_an_nf4_base_at_half_a_byte_per_weight(tiny_lm_dir, tmp_path):
    from lorafleet.train.plan import plan_fleet

    data = write_text_dataset(tmp_path / "d.jsonl", n=4, seed=0)
    plain = plan_fleet(fleet_spec(tiny_lm_dir, tmp_path / "a", data), budget_gb=1.0, dtype=torch.bfloat16)
    nf4 = plan_fleet(fleet_spec(tiny_lm_dir, tmp_path / "b", data, quantize_base="nf4"), 1.0, torch.bfloat16)
    base = FleetTrainer(fleet_spec(tiny_lm_dir, tmp_path / "c", data), progress=False).base
    linear = sum(m.weight.numel() for m in base.language_model.modules() if type(m) is torch.nn.Linear)
    saved = plain.weights - nf4.weights
    assert linear * (2 - 0.6) < saved < linear * (2 - 0.5)  # bf16 → ~0.52 bytes per weight


def test_plan_predicts_each_mode_on_more_gpus(tiny_lm_dir, tmp_path):
    """Adapter-parallel spreads the adapters (their state and activations) over the GPUs and sends
    nothing; data-parallel keeps every adapter and splits the micro-batches, sending a ring
    all-reduce of the fp32 LoRA gradients; FSDP2 also shards the base's weights."""
    from lorafleet.train.plan import gpus_needed, plan_fleet

    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    plan = plan_fleet(fleet_spec(tiny_lm_dir, tmp_path / "out", data), budget_gb=1.0, dtype=torch.float32)
    option = {(o.mode, o.world): o for o in plan.parallel}
    lora_bytes = 4 * sum(load.lora_parameters for load in plan.loads.values())
    assert option["single", 1].peak == plan.together_estimate.total  # three adapters, all admitted
    assert option["adapter", 2].traffic == option["adapter", 4].traffic == 0
    assert option["adapter", 2].peak < option["single", 1].peak
    assert option["data", 2].traffic == int(lora_bytes)  # 2 (w - 1) / w = 1
    assert option["data", 4].traffic == int(1.5 * lora_bytes)
    assert not option["data", 4].possible  # micro_batch_size 2 cannot be split over 4 GPUs
    assert option["fsdp2", 2].peak < option["data", 2].peak
    assert option["fsdp2", 2].traffic > option["data", 2].traffic
    assert option["adapter", 4].speedup == pytest.approx(3.0, rel=0.3)  # three adapters: one per GPU at best
    assert gpus_needed(plan, "data") == 1


def test_plan_counts_a_dora_adapters_magnitudes_and_the_activations_its_rescale_keeps(tiny_lm_dir, tmp_path):
    from lorafleet.train.plan import plan_fleet

    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    adapters = [AdapterSpec(name=name, data=str(data), rank=8, variant=name) for name in ("lora", "dora")]
    plan = plan_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "out"), adapters=adapters))
    lora, dora = plan.alone["lora"], plan.alone["dora"]
    loads = plan.loads
    assert loads["lora"].dora_outputs == 0 and loads["dora"].dora_outputs > 0
    magnitudes = loads["dora"].lora_parameters - loads["lora"].lora_parameters
    assert magnitudes == loads["dora"].dora_outputs  # one magnitude per output feature of every target
    assert dora.adapter_state - lora.adapter_state == magnitudes * (memory.ADAPTER_STATE_BYTES + 4)
    tokens = loads["dora"].rows * loads["dora"].longest
    assert dora.activations - lora.activations == tokens * loads["dora"].dora_outputs * 4  # fp32 on CPU
