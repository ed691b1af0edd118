"""Adapters we save load in peft with the same outputs; adapters peft saves load in lorafleet."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.errors import AdapterError
from lorafleet.models.loading import load_base
from lorafleet.segments import Segment
from tests.conftest import write_image_dataset


def randomised_adapter(fleet: LoRAFleet, name: str, targets, rank: int, seed: int) -> None:
    fleet.add_adapter(name, LoRAShape(rank, 2.0 * rank, 0.0, targets), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in fleet.parameters(name):  # B is zero at init: make it matter
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def test_saved_adapter_gives_peft_the_same_logits_with_images(tiny_vlm_dir, tmp_path):
    base = load_base(tiny_vlm_dir)
    reference_model = copy.deepcopy(base.model)
    fleet = LoRAFleet(base.model, base.language_prefix)
    targets = find_target_modules(base.model, base.language_prefix, ["q_proj", "v_proj", "down_proj"])
    assert all(".language_model." in name for name in targets), "the vision tower must not be adapted"
    randomised_adapter(fleet, "legal", targets, rank=4, seed=0)
    adapter_dir = save_adapter(fleet, "legal", tmp_path / "legal", tiny_vlm_dir)

    examples, _ = load_examples(write_image_dataset(tmp_path / "d.jsonl", n=3, seed=0), base)
    batch = collate(examples, base.tokenizer.pad_token_id)
    with torch.no_grad(), fleet.use("legal", batch.rows):
        ours = base.model(**batch.model_inputs()).logits
    with torch.no_grad():
        without_adapter = base.model(**batch.model_inputs()).logits
    assert (ours - without_adapter).abs().max().item() > 1e-2
    peft_model = PeftModel.from_pretrained(reference_model, adapter_dir)
    with torch.no_grad():
        theirs = peft_model(**batch.model_inputs()).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    vision_lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n and "vision_tower" in n]
    assert vision_lora == []


def test_mixed_batch_gives_each_row_its_own_adapter(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model, base.language_prefix)
    randomised_adapter(fleet, "a", find_target_modules(base.model, "", ["q_proj", "up_proj"]), rank=2, seed=1)
    randomised_adapter(fleet, "b", find_target_modules(base.model, "", ["v_proj"]), rank=8, seed=2)
    ids = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = {}
        for name in ("a", "b", None):
            with fleet.use(name, 4):
                alone[name] = base.model(input_ids=ids).logits
        with fleet.route([Segment("b", 0, 1), Segment(None, 1, 2), Segment("a", 2, 4)]):
            mixed = base.model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], alone["b"][0])
    torch.testing.assert_close(mixed[1], alone[None][1])
    torch.testing.assert_close(mixed[2:], alone["a"][2:])
    assert not torch.allclose(alone["a"], alone[None]) and not torch.allclose(alone["b"], alone[None])


def test_adapter_saved_by_peft_loads_with_the_same_logits(tiny_lm_dir, tmp_path):
    base = load_base(tiny_lm_dir)
    reference = get_peft_model(
        copy.deepcopy(base.model), LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"])
    )
    with torch.no_grad():
        for name, weight in reference.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.1)
    reference.save_pretrained(tmp_path / "from-peft")
    fleet = LoRAFleet(base.model, base.language_prefix)
    shape = load_adapter(fleet, "imported", tmp_path / "from-peft")
    assert shape.rank == 4 and len(shape.modules) == 4
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad(), fleet.use("imported", 2):
        ours = base.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_unknown_target_module_is_a_clear_error(tiny_vlm_dir):
    base = load_base(tiny_vlm_dir)
    with pytest.raises(
        AdapterError, match=r"'qkv_proj' is not a Linear layer of the language model; available: .*q_proj"
    ):
        find_target_modules(base.model, base.language_prefix, ["q_proj", "qkv_proj"])


def test_a_directory_without_adapter_files_is_a_clear_error(tiny_lm_dir, tmp_path):
    fleet = LoRAFleet(load_base(tiny_lm_dir).model)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        load_adapter(fleet, "x", tmp_path)


VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "rslora+dora": {"use_rslora": True, "use_dora": True}}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_saves_as_peft_saves_it_and_peft_gives_the_same_logits(tiny_lm_dir, tmp_path, variant):
    base = load_base(tiny_lm_dir)
    reference_model = copy.deepcopy(base.model)
    fleet = LoRAFleet(base.model, base.language_prefix)
    targets = find_target_modules(base.model, "", ["q_proj", "v_proj", "down_proj"])
    flags = VARIANTS[variant]
    fleet.add_adapter("v", LoRAShape(4, 16.0, 0.0, targets, **flags), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, weight in fleet.named_weights("v"):  # B zero, m = ||W||: make both matter
            weight.add_(torch.randn(weight.shape, generator=generator) * (0.05 if key.endswith("vector") else 0.1))
    adapter_dir = save_adapter(fleet, "v", tmp_path / "v", tiny_lm_dir)

    config = LoraConfig.from_pretrained(str(adapter_dir))
    assert (config.use_rslora, config.use_dora) == (flags.get("use_rslora", False), flags.get("use_dora", False))
    peft_model = PeftModel.from_pretrained(reference_model, adapter_dir)
    ids = torch.randint(0, 300, (2, 9), generator=generator)
    with torch.no_grad(), fleet.use("v", 2):
        ours = base.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        peft_model.save_pretrained(tmp_path / "resaved")
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base.model(input_ids=ids).logits).abs().max().item() > 1e-2
    ours_saved = load_file(adapter_dir / "adapter_model.safetensors")
    peft_saved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert ours_saved.keys() == peft_saved.keys()
    assert all(torch.equal(ours_saved[key], peft_saved[key]) for key in ours_saved)


def test_a_dora_adapter_saved_by_peft_loads_with_the_same_logits(tiny_lm_dir, tmp_path):
    base = load_base(tiny_lm_dir)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["k_proj", "o_proj"])
    reference = get_peft_model(copy.deepcopy(base.model), config)
    with torch.no_grad():
        for name, weight in reference.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                weight.add_(torch.randn_like(weight) * 0.1)
    reference.save_pretrained(tmp_path / "from-peft")
    fleet = LoRAFleet(base.model, base.language_prefix)
    shape = load_adapter(fleet, "imported", tmp_path / "from-peft")
    assert shape.use_dora and shape.use_rslora
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad(), fleet.use("imported", 2):
        ours = base.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_an_adapter_that_changed_its_base_is_refused_with_the_conversion_to_use(tiny_lm_dir, tmp_path):
    base = load_base(tiny_lm_dir)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj"])
    get_peft_model(copy.deepcopy(base.model), config).save_pretrained(tmp_path / "pissa")
    with pytest.raises(AdapterError, match="'pissa'.*path_initial_model_for_weight_conversion"):
        load_adapter(LoRAFleet(base.model), "p", tmp_path / "pissa")
