"""Batches: padding examples together, and stacking several adapters' micro-batches into one.

Sequences are right-padded (pad positions are masked out of attention and of the loss), so a
sequence's outputs do not depend on how much padding follows it: an adapter's rows inside the
fleet batch see exactly what they would see in a batch of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.adapters.layer import Segment
from lorafleet.data.encode import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W), every image of every row in row order

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.pixel_values))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


def collate(examples: Sequence[Example], pad_id: int, length: int | None = None) -> Batch:
    """Right-pad `examples` to `length` (default: the longest)."""
    length = length or max(example.num_tokens for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.num_tokens
        input_ids[row, :n] = example.input_ids
        labels[row, :n] = example.labels
        attention_mask[row, :n] = 1
    images = [example.pixel_values for example in examples if example.pixel_values is not None]
    return Batch(input_ids, attention_mask, labels, torch.cat(images) if images else None)


def stack_micro_batches(
    micro_batches: Sequence[tuple[str, Sequence[Example]]], pad_id: int
) -> tuple[Batch, list[Segment]]:
    """One batch holding every adapter's micro-batch, and the row segment of each adapter."""
    examples = [example for _, group in micro_batches for example in group]
    batch = collate(examples, pad_id)
    segments, start = [], 0
    for adapter, group in micro_batches:
        segments.append(Segment(adapter, start, start + len(group)))
        start += len(group)
    return batch, segments
