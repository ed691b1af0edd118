"""How well a model predicts labelled tokens: the losses and log-probabilities that training,
held-out evaluation, the reference cache and `lorafleet eval`'s preference scores are taken from.

A `ScoredBatch` is a batch with its layout: which rows (or packed tokens) each adapter is routed
to, what one loss each is taken over, and where the labels are, all found on the host while the
batch is built, so that scoring it never waits for the device. `sequence_losses` reads what it
needs from it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.layer import MultiLoRALinear
from lorafleet.data.batch import Batch, stack_micro_batches
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.data.preference import PreferencePair
from lorafleet.models.attention import training_attention
from lorafleet.models.hf_compat import inner_model
from lorafleet.models.loading import FrozenBase
from lorafleet.segments import Segment
from lorafleet.train.loss import (
    LabelPositions,
    chunked_segment_losses,
    label_positions,
    loss_dtype,
    segment_losses,
)


@dataclass
class ScoredBatch:
    """A batch on the device and its layout."""

    batch: Batch
    routing: list[Segment]  # every adapter's rows or tokens (and a packed row's padding tail)
    scored: list[Segment]  # what one loss each is taken over: an SFT adapter's segment, each answer of a pair
    packed: bool = False  # one packed row: segments count tokens, not rows
    labels_at: LabelPositions | None = None  # where the labels of `scored` are (the chunked loss), on the device
    model_kwargs: dict = field(default_factory=dict)  # more model inputs: packed sequence offsets for varlen

    @classmethod
    def lay_out(
        cls,
        batch: Batch,
        routing: list[Segment],
        scored: list[Segment],
        device: torch.device,
        chunked: bool,
        packed: bool = False,
        model_kwargs: dict | None = None,
    ) -> ScoredBatch:
        """`batch` (on the host) moved to `device`, with its label positions found first when the
        loss is chunked."""
        labels_at = label_positions(batch.labels, scored, by_token=packed).to(device) if chunked else None
        return cls(batch.to(device), routing, scored, packed, labels_at, model_kwargs or {})


def sequence_losses(base: FrozenBase, scored: ScoredBatch, chunked: bool) -> list[torch.Tensor]:
    """One loss per scored segment (mean over its label tokens). The batch goes in without an
    attention mask: its rows are right-padded or packed, so causal attention alone is exact for
    every real token. `chunked`: only label positions go through the output head (unless the head
    itself carries adapters)."""
    head = base.model.get_output_embeddings()
    batch = scored.batch
    inputs = batch.causal_inputs() | scored.model_kwargs
    if chunked and not isinstance(head, MultiLoRALinear):
        hidden = inner_model(base.model)(**inputs, use_cache=False).last_hidden_state
        return chunked_segment_losses(
            hidden, head, batch.labels, scored.scored, by_token=scored.packed, where=scored.labels_at
        )
    logits = base.model(**inputs, use_cache=False).logits
    return segment_losses(logits, batch.labels, scored.scored, by_token=scored.packed)


def answer_logps(
    base: FrozenBase,
    fleet: LoRAFleet,
    groups: list[tuple[str | None, list[PreferencePair]]],
    length_multiple: int = 1,
    chunked: bool = True,
) -> list[torch.Tensor]:
    """Summed log-probabilities of every answer of each group's pairs under the adapter the group
    is routed to (None: the base alone), [chosen..., rejected...] per group, in one no-grad pass."""
    micro_batches = [(route, answer_rows(pairs)) for route, pairs in groups]
    batch, _ = stack_micro_batches(micro_batches, base.tokenizer.pad_token_id, length_multiple)
    rows = [example for _, group in micro_batches for example in group]
    routes = [route for route, group in micro_batches for _ in group]
    answers = [Segment(route, row, row + 1) for row, route in enumerate(routes)]
    tokens = torch.tensor([label_count(example) for example in rows], dtype=loss_dtype(base.dtype))
    scored = ScoredBatch.lay_out(batch, answers, answers, base.device, chunked)
    with torch.no_grad(), training_attention(), fleet.route(answers):
        means = sequence_losses(base, scored, chunked=chunked)
    logps = -torch.stack(means) * tokens.to(base.device)
    return list(logps.split([len(group) for _, group in micro_batches]))


def answer_rows(pairs: list[PreferencePair]) -> list[Example]:
    """The sequences of a preference micro-batch, as TRL orders them: every chosen, then every rejected."""
    return [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]


def answer_segments(segment: Segment, rows: list[Example], packed: bool) -> list[Segment]:
    """An adapter's segment cut into one segment per sequence (rows, or a packed row's tokens)."""
    if not packed:
        return [Segment(segment.adapter, row, row + 1) for row in range(segment.start, segment.end)]
    pieces, start = [], segment.start
    for example in rows:
        pieces.append(Segment(segment.adapter, start, start + example.num_tokens))
        start += example.num_tokens
    return pieces


def label_count(example: Example) -> int:
    """Label tokens a loss over `example` averages over (each token predicts the next one's label)."""
    return int((example.labels[1:] != IGNORE_INDEX).sum())


def packed_sequence_lengths(micro_batches, batch) -> list[int]:
    """Lengths of the sequences of a packed row, in order, its padding tail included."""
    lengths = [example.num_tokens for _, group in micro_batches for example in group]
    tail = batch.input_ids.shape[1] - sum(lengths)
    return lengths + [tail] if tail else lengths
