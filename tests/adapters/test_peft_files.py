"""Adapters we save load in peft with the same outputs; adapters peft saves load in lorafleet."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

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
