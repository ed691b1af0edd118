"""Batches: padding examples together, and stacking several adapters' micro-batches into one.

Sequences are right-padded (pad positions carry no label), so a sequence's outputs do not depend
on how much padding follows it: an adapter's rows inside the fleet batch see exactly what they
would see in a batch of their own. Under causal attention a real token never sees the padding
after it, so training needs no attention mask at all (`Batch.causal_inputs`): attention runs as
plain causal attention, which every fast kernel (flash, memory-efficient) supports.

Lengths are rounded up to a multiple (`multiple_of`, 64 in training) so that a GPU sees few
distinct shapes: each new shape costs a kernel plan (cuDNN), a compile or a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.segments import Segment


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None  # (B, L); None for a packed batch
    labels: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W), every image of every row in row order
    position_ids: torch.Tensor | None = None  # (B, L), restarting at 0 per packed sequence

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.labels),
            move(self.pixel_values),
            move(self.position_ids),
        )

    def causal_inputs(self) -> dict[str, torch.Tensor]:
        """The model inputs without the attention mask: exact for right-padded or packed rows under
        causal attention (every real token's keys are real), and the form fast kernels take."""
        inputs = self.model_inputs()
        inputs.pop("attention_mask", None)
        return inputs

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids}
        optional = {
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "pixel_values": self.pixel_values,
        }
        inputs.update({key: value for key, value in optional.items() if value is not None})
        return inputs


def padded_length(length: int, multiple_of: int) -> int:
    return -(-length // multiple_of) * multiple_of


def collate(examples: Sequence[Example], pad_id: int, length: int | None = None, multiple_of: int = 1) -> Batch:
    """Right-pad `examples` to `length` (default: the longest, rounded up to `multiple_of`)."""
    length = length or padded_length(max(example.num_tokens for example in examples), multiple_of)
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


def pack_micro_batches(
    micro_batches: Sequence[tuple[str, Sequence[Example]]], pad_id: int = 0, multiple_of: int = 1
) -> tuple[Batch, list[Segment]]:
    """Every sequence of every adapter back to back in one row.

    Positions restart at 0 for each sequence, which is how transformers and the varlen attention
    recognise packed sequences and keep attention inside each of them. The first token of every
    sequence is never a label, so no prediction crosses from one sequence into the next. Segments
    count tokens. With `multiple_of`, the row ends in a padding sequence of its own (no labels, no
    adapter: a `Segment(None, ...)`) that rounds its length up.
    """
    ids, labels, positions, images, segments, start = [], [], [], [], [], 0
    for adapter, group in micro_batches:
        length = 0
        for example in group:
            ids.append(example.input_ids)
            labels.append(torch.cat([torch.tensor([IGNORE_INDEX]), example.labels[1:]]))
            positions.append(torch.arange(example.num_tokens))
            if example.pixel_values is not None:
                images.append(example.pixel_values)
            length += example.num_tokens
        segments.append(Segment(adapter, start, start + length))
        start += length
    tail = padded_length(start, multiple_of) - start
    if tail:
        ids.append(torch.full((tail,), pad_id, dtype=torch.long))
        labels.append(torch.full((tail,), IGNORE_INDEX, dtype=torch.long))
        positions.append(torch.arange(tail))
        segments.append(Segment(None, start, start + tail))
    batch = Batch(
        torch.cat(ids)[None],
        None,
        torch.cat(labels)[None],
        torch.cat(images) if images else None,
        torch.cat(positions)[None],
    )
    return batch, segments


def stack_micro_batches(
    micro_batches: Sequence[tuple[str, Sequence[Example]]], pad_id: int, multiple_of: int = 1
) -> tuple[Batch, list[Segment]]:
    """One batch holding every adapter's micro-batch, and the row segment of each adapter."""
    examples = [example for _, group in micro_batches for example in group]
    batch = collate(examples, pad_id, multiple_of=multiple_of)
    segments, start = [], 0
    for adapter, group in micro_batches:
        segments.append(Segment(adapter, start, start + len(group)))
        start += len(group)
    return batch, segments
