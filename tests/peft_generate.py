"""The reference for every greedy reply lorafleet serves or scores: transformers' `generate`,
through peft for an adapter, one prompt at a time."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel

from lorafleet.data.encode import encode_prompt
from lorafleet.data.records import ChatRecord
from lorafleet.models.loading import load_base


def peft_greedy_replies(
    fleet_dir: Path, adapter: str | None, records: list[ChatRecord], max_new_tokens: int
) -> list[str]:
    """Each record's greedy reply (the record's messages are the prompt), decoded without special tokens."""
    base = load_base(fleet_dir / "base")
    model = base.model
    if adapter is not None:
        model = PeftModel.from_pretrained(copy.deepcopy(base.model), fleet_dir / "adapters" / adapter)
    replies = []
    for record in records:
        prompt = encode_prompt(record, base)
        inputs = {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones_like(prompt.input_ids)[None]}
        if prompt.pixel_values is not None:
            inputs["pixel_values"] = prompt.pixel_values
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=base.tokenizer.eos_token_id,
                pad_token_id=base.tokenizer.pad_token_id,
            )
        replies.append(base.tokenizer.decode(output[0, prompt.num_tokens :], skip_special_tokens=True))
    return replies
