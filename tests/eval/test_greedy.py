"""Greedy replies through the serving engine are the replies transformers' `generate` gives (with
peft for an adapter): the demo's table, compression's report and `lorafleet eval` score what the
reference implementation would answer, prompts of several lengths and images decoded together."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.data.records import ChatRecord, Message, read_records
from lorafleet.eval.greedy import base_exact_match, generate_replies
from lorafleet.models.loading import load_base
from tests.conftest import write_image_dataset
from tests.peft_generate import peft_greedy_replies


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory, tiny_vlm_dir):
    """base/ and one adapter whose random weights change the answers."""
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(tiny_vlm_dir, root / "base")
    base = load_base(root / "base")
    fleet = LoRAFleet(base.model, base.language_prefix)
    modules = find_target_modules(base.model, base.language_prefix, ["q_proj", "v_proj", "down_proj"])
    fleet.add_adapter("legal", LoRAShape(4, 8.0, 0.0, modules), seed=0)
    generator = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for weight in fleet.parameters("legal"):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    save_adapter(fleet, "legal", root / "adapters" / "legal", root / "base")
    return root


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ChatRecord]:
    """Held-out chats with pictures of several aspect ratios: prompts of different lengths."""
    return read_records(write_image_dataset(tmp_path_factory.mktemp("held-out") / "test.jsonl", n=6, seed=3))[0]


def generate_reference(fleet_dir, adapter: str | None, records: list[ChatRecord], max_new_tokens: int) -> list[str]:
    """transformers' greedy `generate` (through peft for an adapter) for each record's prompt: its
    messages but the last (the answer scored)."""
    prompts = [ChatRecord(record.messages[:-1], record.images, record.source) for record in records]
    return [reply.strip() for reply in peft_greedy_replies(fleet_dir, adapter, prompts, max_new_tokens)]


def test_greedy_replies_of_the_base_and_an_adapter_are_transformers_generate(fleet_dir, records):
    base = load_base(fleet_dir / "base")
    fleet = LoRAFleet(base.model, base.language_prefix)
    load_adapter(fleet, "legal", fleet_dir / "adapters" / "legal")
    ours = {adapter: generate_replies(base, fleet, adapter, records) for adapter in (None, "legal")}
    assert ours[None] != ours["legal"], "the adapter changes the answers"
    for adapter, replies in ours.items():
        assert replies == generate_reference(fleet_dir, adapter, records, max_new_tokens=8), adapter


def test_the_base_alone_is_scored_by_exact_match_of_its_greedy_replies(fleet_dir, records):
    """What compression reports per stage: one held-out answer is the base's own reply, the others not."""
    first = generate_reference(fleet_dir, None, records[:1], max_new_tokens=8)[0]
    answers = [first] + ["not what it says"] * (len(records) - 1)
    held_out = [
        ChatRecord([*record.messages[:-1], Message("assistant", answer)], record.images, record.source)
        for record, answer in zip(records, answers, strict=True)
    ]
    assert base_exact_match(load_base(fleet_dir / "base"), held_out) == 1 / len(records)
