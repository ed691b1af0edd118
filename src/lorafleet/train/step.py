"""The layout of one fleet step, built on the host before the device is asked for anything.

Every active adapter's micro-batch goes into one batch: right-padded rows, or with `packing` one
row of sequences back to back. Each adapter's objective says which sequences its micro-batch
puts in (an SFT micro-batch's examples; a preference micro-batch's chosen answers, then its
rejected ones) and what its losses are taken over (its whole segment, or each answer). Everything
the step needs to know about the batch's shape (token counts, label positions, packed sequence
offsets) is read here, so forward, backward and the optimizer step never wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.config import FleetSpec
from lorafleet.data.batch import pack_micro_batches, stack_micro_batches
from lorafleet.models import varlen
from lorafleet.models.loading import FrozenBase
from lorafleet.train.job import AdapterJob
from lorafleet.train.objectives import MicroBatch
from lorafleet.train.scoring import ScoredBatch, packed_sequence_lengths


@dataclass
class StepInputs:
    """One fleet step, assembled on the host."""

    batch: ScoredBatch  # every active adapter's micro-batch, on the device, with its layout
    parts: list[MicroBatch]  # each active job's part of it, in the order of the jobs

    @property
    def tokens(self) -> list[int]:
        """Real tokens per adapter (of its whole micro-batch)."""
        return [part.tokens for part in self.parts]

    def per_part(self, losses: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The losses of the scored segments, split by the part they belong to."""
        split, start = [], 0
        for part in self.parts:
            split.append(losses[start : start + part.scored])
            start += part.scored
        return split


class StepLayout:
    """How a fleet's steps are laid out: padded or packed, to which length multiple, with the
    label positions the chunked loss needs, and the packed sequence offsets varlen attention needs."""

    def __init__(self, base: FrozenBase, spec: FleetSpec, attention: str | None, answer_dtype: torch.dtype) -> None:
        self.base = base
        self.packed, self.length_multiple, self.chunked = spec.packing, spec.length_multiple, spec.chunked_loss
        self.attention = attention
        self.answer_dtype = answer_dtype  # of the preference objectives' per-answer token counts

    def lay_out(
        self, jobs: list[AdapterJob], drawn: list[list], mine: list[list], shares: list | None = None
    ) -> StepInputs:
        """The step of `jobs` from the micro-batch each drew (`drawn`), of which this process
        trains `mine` (all of it on one process) with its `shares` of each mean (data-parallel)."""
        shares = shares or [None] * len(jobs)
        device = self.base.device
        micro_batches = [(job.name, job.objective.rows(items)) for job, items in zip(jobs, mine, strict=True)]
        pad_id = self.base.tokenizer.pad_token_id
        if self.packed:
            batch, routing = pack_micro_batches(micro_batches, pad_id, self.length_multiple)
        else:
            batch, routing = stack_micro_batches(micro_batches, pad_id, self.length_multiple)
        adapter_segments = [segment for segment in routing if segment.adapter is not None]
        scored, parts = [], []
        for job, segment, (_, rows), whole, items, share in zip(
            jobs, adapter_segments, micro_batches, drawn, mine, shares, strict=True
        ):
            pieces = job.objective.loss_segments(segment, rows, self.packed)
            scored += pieces
            answer_tokens = job.objective.answer_tokens(rows, device, self.answer_dtype)
            parts.append(MicroBatch(whole, items, job.objective.tokens(whole), len(pieces), answer_tokens, share))
        model_kwargs = {}
        if self.packed and self.attention == "varlen":
            model_kwargs = varlen.sequence_offsets(packed_sequence_lengths(micro_batches, batch), device)
        laid_out = ScoredBatch.lay_out(batch, routing, scored, device, self.chunked, self.packed, model_kwargs)
        return StepInputs(laid_out, parts)
