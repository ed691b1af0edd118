"""Training adapters together must give the same weights as training each alone with peft.

Both sides train in float64, where rounding cannot be amplified by AdamW into a visible difference
(tests/tolerances.py derives the bound). The paths float64 cannot take (the NF4 base of QLoRA, the
fused kernels, which accumulate in float32) are held to peft one fleet step at a time instead: their
gradients from the same weights, which no optimizer has amplified."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file
from transformers import get_scheduler

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import peft_target_modules, save_adapter
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.data.stream import ExampleStream
from lorafleet.models.hf_compat import norms_in_float64
from lorafleet.models.loading import load_base
from lorafleet.train.job import total_optimizer_steps
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests import tolerances
from tests.conftest import write_image_dataset, write_text_dataset

SCHEDULE_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def three_adapters(data: list[Path]) -> list[AdapterSpec]:
    return [
        AdapterSpec(
            name="finance",
            data=str(data[0]),
            rank=4,
            alpha=8,
            target_modules=["q_proj", "v_proj"],
            learning_rate=3e-3,
            micro_batch_size=2,
            grad_accum=2,
            steps=20,
            seed=1,
            schedule="linear",
            warmup_steps=3,
        ),
        AdapterSpec(
            name="legal",
            data=str(data[1]),
            rank=8,
            alpha=32,
            target_modules=["o_proj", "gate_proj", "down_proj"],
            learning_rate=1e-3,
            micro_batch_size=3,
            grad_accum=1,
            steps=24,
            seed=2,
            schedule="cosine",
            max_grad_norm=0.5,
        ),
        AdapterSpec(
            name="hr",
            data=str(data[2]),
            rank=2,
            alpha=4,
            target_modules=["k_proj", "up_proj", "q_proj"],
            learning_rate=5e-3,
            micro_batch_size=1,
            grad_accum=1,
            steps=21,
            seed=3,
            schedule="constant",
            shuffle=False,
        ),
    ]


def train_alone_with_peft(
    model_dir: Path,
    spec: AdapterSpec,
    workdir: Path,
    quantize: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    history: list[tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """The reference: one adapter, plain peft + torch, the textbook loop (QLoRA: on the same NF4 base).
    `history`, when given, receives each optimizer step's (loss, gradient norm before clipping)."""
    base = load_base(model_dir, device=device, dtype=dtype, quantize=quantize)
    # Start from the same initial weights: our init, written as a PEFT directory, loaded by peft; in
    # the training's dtype, where DoRA's initial magnitudes (the base's norms) are computed.
    init_dtype = dtype or torch.float32
    init_fleet = LoRAFleet(load_base(model_dir, device="cpu", dtype=init_dtype).model, base.language_prefix)
    targets = find_target_modules(init_fleet.model, base.language_prefix, spec.target_modules)
    init_fleet.add_adapter(spec.name, initial_shape(spec, targets), seed=spec.seed, dtype=init_dtype)
    init_dir = save_adapter(init_fleet, spec.name, workdir / f"init-{spec.name}", model_dir)

    conversion = None  # PiSSA / OLoRA: where peft keeps the initial adapter its save converts against
    if spec.init in ("pissa", "olora"):
        conversion = workdir / f"peft-init-{spec.name}"
        model = peft_from_the_base(model_dir, spec, targets, base, conversion)
    else:
        model = PeftModel.from_pretrained(base.model, init_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    examples, _ = load_examples(spec.data, base)
    stream = ExampleStream(examples, spec.micro_batch_size, spec.seed, spec.shuffle)
    steps = total_optimizer_steps(spec, len(examples))
    if spec.loraplus_lr_ratio:  # peft's LoRA+ groups: B and 1-D parameters at lr x ratio
        optimizer = create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=spec.learning_rate, loraplus_lr_ratio=spec.loraplus_lr_ratio,
            loraplus_weight_decay=spec.weight_decay,
        )  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_scheduler(
        SCHEDULE_NAMES[spec.schedule], optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=steps
    )
    for _ in range(steps):
        step_loss = 0.0
        for _ in range(spec.grad_accum):
            batch = collate(stream.next_micro_batch(), base.tokenizer.pad_token_id).to(base.device)
            loss = causal_lm_loss(model(**batch.model_inputs()).logits, batch.labels)
            (loss / spec.grad_accum).backward()
            step_loss += loss.item() / spec.grad_accum
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        if history is not None:
            history.append((step_loss, norm))
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    out = workdir / f"peft-{spec.name}"
    model.save_pretrained(out, path_initial_model_for_weight_conversion=conversion and str(conversion))
    return load_file(out / "adapter_model.safetensors")


def peft_from_the_base(model_dir: Path, spec: AdapterSpec, targets, base, conversion: Path) -> PeftModel:
    """peft's own PiSSA / OLoRA start for `spec` on `base` (modified in place): the factors from a
    float32 copy of the base (peft decomposes in float32 and refuses float64), then in `base`'s
    dtype with the residual W - s·B0·A0 recomputed there, so that a float64 reference is exact;
    the initial adapter is saved to `conversion` first, as peft's conversion on save needs it."""
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, use_rslora=spec.use_rslora, init_lora_weights=spec.init,
        target_modules=peft_target_modules(targets, base.language_prefix),
    )  # fmt: skip
    model = get_peft_model(load_base(model_dir, device="cpu").model, config)
    model.peft_config["default"].init_lora_weights = True  # what peft's docs say to save the start with
    model.save_pretrained(conversion)
    model.peft_config["default"].init_lora_weights = spec.init
    model = model.to(base.dtype)
    norms_in_float64(model)  # as load_base makes a float64 model's norms compute
    with torch.no_grad():
        for target in targets:
            layer = model.base_model.model.get_submodule(target)
            start = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            original = base.model.get_submodule(target).weight
            layer.base_layer.weight.copy_(original - layer.scaling["default"] * start)
    model.base_model.model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def initial_shape(spec: AdapterSpec, targets: tuple[str, ...]) -> LoRAShape:
    """The shape the trainer gives `spec`'s adapter (its variant included), without dropout."""
    return LoRAShape(spec.rank, spec.alpha, 0.0, targets, spec.use_rslora, spec.variant == "dora", spec.init)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (mean cross-entropy of each token's next label) in the logits'
    own precision: transformers casts them to float32 first, which would undo a float64 reference."""
    shifted = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


# Every fast path of the trainer, alone and together; each must still equal peft.
MODES = {
    "padded": {},
    "packed": {"packing": True},  # with the default attention for packing: varlen
    "full-logits": {"chunked_loss": False},
    "recomputed": {"activation_checkpointing": True},
    "packed+recomputed": {"packing": True, "activation_checkpointing": True},
    "packed+eager": {"packing": True, "attention": "eager"},
    "packed+sdpa": {"packing": True, "attention": "sdpa"},  # one masked row
    "padded+varlen": {"attention": "varlen"},
}


def assert_fleet_matches_peft(model_dir: Path, data: list[Path], tmp_path: Path, mode: dict) -> None:
    adapters = three_adapters(data)
    settings = dict(checkpoint_every=0, dtype="float64") | mode
    spec = FleetSpec(base=str(model_dir), output=str(tmp_path / "fleet"), adapters=adapters, **settings)
    result = train_fleet(spec, progress=False)
    tolerance = tolerances.fleet_weights(adapters)
    for adapter in adapters:
        ours = load_file(result.adapters[adapter.name] / "adapter_model.safetensors")
        reference = train_alone_with_peft(model_dir, adapter, tmp_path, dtype=torch.float64)
        assert ours.keys() == reference.keys()
        moved = max(
            (reference[k] - load_file(tmp_path / f"init-{adapter.name}" / "adapter_model.safetensors")[k])
            .abs()
            .max()
            .item()
            for k in reference
        )
        assert moved > 1e-3, "training must actually change the weights for the comparison to mean anything"
        worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
        assert worst <= tolerance, f"{adapter.name}: max |fleet - peft| = {worst:.2e}"


def with_perturbed_inits(model_dir: Path, adapters: list[AdapterSpec], workdir: Path) -> list[AdapterSpec]:
    """The adapters, each starting from a saved init whose B is not zero (drawn from its seed), so
    that the first step's gradients of A and B are both nonzero."""
    base = load_base(model_dir, device="cpu")
    fleet = LoRAFleet(base.model, base.language_prefix)
    started = []
    for spec in adapters:
        targets = find_target_modules(base.model, base.language_prefix, spec.target_modules)
        fleet.add_adapter(spec.name, initial_shape(spec, targets), seed=spec.seed)
        generator = torch.Generator().manual_seed(spec.seed + 100)
        with torch.no_grad():
            for key, weight in fleet.named_weights(spec.name):
                if key.endswith("lora_B"):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
        directory = save_adapter(fleet, spec.name, workdir / f"init-{spec.name}", model_dir)
        started.append(dataclasses.replace(spec, init_from=str(directory)))
    return started


def fleet_first_step_gradients(model_dir: Path, adapters: list[AdapterSpec], mode: dict, output: Path) -> dict:
    """Adapter -> module.lora_A|lora_B -> gradient of the fleet's first step (before any optimizer step)."""
    spec = FleetSpec(base=str(model_dir), output=str(output), adapters=adapters, checkpoint_every=0, **mode)
    trainer = FleetTrainer(spec, progress=False)
    trainer._prepare_output(resume=False)
    trainer._admit()
    trainer._forward_backward(trainer._prepare_step())
    return {
        job.name: {key: w.grad.clone() for key, w in trainer.fleet.named_weights(job.name)} for job in trainer.active
    }


def peft_first_step_gradients(model_dir: Path, spec: AdapterSpec, quantize: str | None = None, pad_to: int = 1) -> dict:
    """The same for `spec` alone with plain peft: its first micro-batch (padded to a multiple of
    `pad_to`), loss / grad_accum, backward."""
    base = load_base(model_dir, device="cpu", quantize=quantize)
    model = PeftModel.from_pretrained(base.model, spec.init_from, is_trainable=True)
    examples, _ = load_examples(spec.data, base)
    stream = ExampleStream(examples, spec.micro_batch_size, spec.seed, spec.shuffle)
    batch = collate(stream.next_micro_batch(), base.tokenizer.pad_token_id, multiple_of=pad_to)
    (causal_lm_loss(model(**batch.model_inputs()).logits, batch.labels) / spec.grad_accum).backward()
    return {
        name.removeprefix("base_model.model.").replace(".default.weight", ""): weight.grad
        for name, weight in model.named_parameters()
        if weight.requires_grad
    }


def assert_first_step_matches_peft(
    model_dir: Path, data: list[Path], tmp_path: Path, mode: dict, only: str | None = None, pad_to: int = 1
) -> None:
    """For paths that cannot run in float64: each adapter's gradients of one fleet step equal peft's
    for that adapter alone, from the same (perturbed) weights, to float32 rounding."""
    adapters = [a for a in three_adapters(data) if only in (None, a.name)]
    adapters = with_perturbed_inits(model_dir, adapters, tmp_path)
    ours = fleet_first_step_gradients(model_dir, adapters, mode, tmp_path / "fleet")
    tolerance = tolerances.float32_gradients(layers=len(load_base(model_dir, device="cpu").language_model.layers))
    for adapter in adapters:
        reference = peft_first_step_gradients(model_dir, adapter, mode.get("quantize_base"), pad_to)
        assert ours[adapter.name].keys() == reference.keys()
        for key, gradient in reference.items():
            scale = gradient.abs().max().item()
            assert scale > 0, f"{adapter.name} {key}: a zero gradient compares nothing"
            difference = (ours[adapter.name][key] - gradient).abs().max().item()
            assert difference <= tolerance * scale, f"{adapter.name} {key}: {difference / scale:.2e} of the largest"


SLOW = pytest.mark.slow  # the fast loop keeps one padded and one packed mode


@pytest.mark.parametrize(
    "mode",
    ["padded", "packed", *(pytest.param(m, marks=SLOW) for m in ("full-logits", "recomputed", "packed+eager",
                                                                "packed+sdpa", "padded+varlen"))],
)  # fmt: skip
def test_adapters_trained_together_match_peft_alone_on_qwen2(tiny_lm_dir, tmp_path, mode):
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=13 + 4 * i, seed=i) for i in range(3)]
    assert_fleet_matches_peft(tiny_lm_dir, data, tmp_path, MODES[mode])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padded", "packed+recomputed", "packed+sdpa", "padded+varlen"])
def test_adapters_trained_together_match_peft_alone_on_internvl_with_images(tiny_vlm_dir, tmp_path, mode):
    data = [write_image_dataset(tmp_path / f"d{i}.jsonl", n=11 + 3 * i, seed=i) for i in range(3)]
    assert_fleet_matches_peft(tiny_vlm_dir, data, tmp_path, MODES[mode])


@pytest.mark.slow
def test_fused_kernel_fleet_step_equals_peft(tiny_lm_dir, tmp_path, monkeypatch):
    """A whole fleet step on the fused Triton path (GPU, or Triton's interpreter on CPU); the kernels
    accumulate in float32, so the step's gradients are compared, not trained weights."""
    pytest.importorskip("triton", reason="the fused kernels need Triton")
    from lorafleet.adapters import fused

    monkeypatch.setenv("LORAFLEET_FUSED_LORA", "1")
    if not fused.is_enabled(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
    calls = []
    original = fused.fused_lora_delta
    monkeypatch.setattr(fused, "fused_lora_delta", lambda *a: calls.append(1) or original(*a))
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=13 + 4 * i, seed=i) for i in range(3)]
    assert_first_step_matches_peft(tiny_lm_dir, data, tmp_path, {"packing": True})
    assert calls, "the fused kernels must actually have run"


def test_qlora_fleet_step_equals_peft_qlora_on_the_same_nf4_base(tiny_lm_dir, tmp_path):
    """QLoRA: a fleet step on an NF4 base (bitsandbytes) equals peft on the same NF4 base. NF4 takes
    no float64 weights, so the step's gradients are compared, not trained weights."""
    from bitsandbytes.nn import Linear4bit

    base = load_base(tiny_lm_dir, device="cpu", quantize="nf4")
    assert isinstance(base.model.model.layers[0].mlp.down_proj, Linear4bit)
    assert not isinstance(base.model.lm_head, Linear4bit)
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=13 + 4 * i, seed=i) for i in range(3)]
    # One adapter, and peft's batch padded as the fleet pads it: bitsandbytes' CPU 4-bit matmul
    # computes some shapes in bfloat16 (a (6, 64)-token input comes out 5e-3 off, (6, 128) exact),
    # so only equal shapes on both sides make a float32 comparison; adapters trained together equal
    # each alone in every float64 mode above.
    mode = {"quantize_base": "nf4"}
    assert_first_step_matches_peft(tiny_lm_dir, data, tmp_path, mode, only="legal", pad_to=FleetSpec.length_multiple)


def test_qlora_on_internvl_quantizes_the_language_model_only(tiny_vlm_dir, tmp_path):
    from bitsandbytes.nn import Linear4bit

    base = load_base(tiny_vlm_dir, device="cpu", quantize="nf4")
    kinds = {name: type(m) for name, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(kind is Linear4bit for name, kind in kinds.items() if name.startswith("model.language_model."))
    assert not any(kind is Linear4bit for name, kind in kinds.items() if not name.startswith("model.language_model."))
    data = write_image_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    adapters = [AdapterSpec(name="a", data=str(data), rank=4, steps=6, learning_rate=1e-2, micro_batch_size=4)]
    spec = FleetSpec(base=str(tiny_vlm_dir), output=str(tmp_path / "out"), adapters=adapters, quantize_base="nf4")
    result = train_fleet(spec, progress=False)
    assert result.losses["a"][-1] < result.losses["a"][0]
