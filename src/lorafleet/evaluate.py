"""Held-out evaluation: greedy replies from the base or one adapter, and exact-match accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example, encode_prompt
from lorafleet.data.records import ChatRecord
from lorafleet.models.loading import FrozenBase


@torch.no_grad()
def generate_replies(
    base: FrozenBase,
    fleet: LoRAFleet,
    adapter: str | None,
    records: Sequence[ChatRecord],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies to each record's prompt (its last assistant turn is dropped if present)."""
    replies: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [encode_prompt(_without_last_reply(r), base) for r in records[start : start + batch_size]]
        inputs = left_padded_inputs(prompts, base.tokenizer.pad_token_id, base.device)
        with fleet.use(adapter, len(prompts)):
            output = base.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=base.tokenizer.eos_token_id,
                pad_token_id=base.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies.extend(base.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [reply.strip() for reply in replies]


def exact_match_accuracy(replies: Sequence[str], answers: Sequence[str]) -> float:
    matches = sum(_normalise(reply) == _normalise(answer) for reply, answer in zip(replies, answers, strict=True))
    return matches / len(answers)


def reference_answers(records: Sequence[ChatRecord]) -> list[str]:
    return [record.messages[-1].text for record in records]


def _normalise(text: str) -> str:
    return text.strip().lower().rstrip(".")


def _without_last_reply(record: ChatRecord) -> ChatRecord:
    if record.messages[-1].role != "assistant":
        return record
    return ChatRecord(record.messages[:-1], record.images, record.source)


def left_padded_inputs(prompts: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for `generate`: prompts left-padded so that every row ends where generation starts."""
    length = max(p.num_tokens for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - prompt.num_tokens :] = prompt.input_ids
        attention_mask[row, length - prompt.num_tokens :] = 1
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    images = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if images:
        inputs["pixel_values"] = torch.cat(images).to(device)
    return inputs
