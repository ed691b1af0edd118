"""Causal-LM loss per adapter segment: mean cross-entropy over that adapter's label tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.segments import Segment


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where cross-entropy is computed: float32 for a bf16/fp16/fp32 model, float64 for a float64
    one (whose point is rounding noise far below the optimizer's epsilon: equivalence tests)."""
    return torch.promote_types(dtype, torch.float32)


def segment_losses(
    logits: torch.Tensor, labels: torch.Tensor, segments: Sequence[Segment], by_token: bool = False
) -> list[torch.Tensor]:
    """Semantics: for each segment, CE(logits[s:e, t], labels[s:e, t+1]) averaged over label tokens;
    `by_token` (one packed row): CE(logits[0, t], labels[0, t+1]) for t in [s, e).

    Prompt, image and padding positions carry IGNORE_INDEX and count for nothing.
    """
    shift_logits = logits[:, :-1].to(loss_dtype(logits.dtype))
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    if by_token:  # the last token predicts the next sequence's first, which is never a label
        per_token, shift_labels = per_token.reshape(-1, 1), shift_labels.reshape(-1, 1)
    losses = []
    for segment in segments:
        rows = slice(segment.start, segment.end)
        count = (shift_labels[rows] != IGNORE_INDEX).sum().clamp(min=1)
        losses.append(per_token[rows].sum() / count)
    return losses


# Logit elements per chunk: 16M fp32 values = 64 MiB, ~110 rows of a 150k vocabulary.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class LabelPositions:
    """Where the labels of a batch are, found once on the host: gathering by them on the device
    never waits for the device (a boolean-mask index or `bincount` there would)."""

    positions: torch.Tensor  # (n,) indices into hidden.reshape(-1, width) of tokens that predict a label
    targets: torch.Tensor  # (n,) the label each predicts
    owners: torch.Tensor  # (n,) the segment each belongs to
    counts: torch.Tensor  # (segments,) label tokens per segment, at least 1

    def to(self, device: torch.device) -> LabelPositions:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return LabelPositions(move(self.positions), move(self.targets), move(self.owners), move(self.counts))


def label_positions(labels: torch.Tensor, segments: Sequence[Segment], by_token: bool = False) -> LabelPositions:
    """Token t of row b predicts labels[b, t + 1]; keep those with a label inside a segment."""
    rows, length = labels.shape
    segment_of = torch.full((rows, length), -1, dtype=torch.long, device=labels.device)
    for index, segment in enumerate(segments):
        if by_token:
            segment_of[0, segment.start : segment.end] = index
        else:
            segment_of[segment.start : segment.end] = index
    next_label = torch.full_like(labels, IGNORE_INDEX)
    next_label[:, :-1] = labels[:, 1:]
    wanted = (next_label != IGNORE_INDEX) & (segment_of >= 0)
    positions = wanted.flatten().nonzero().flatten()
    owners = segment_of.flatten()[positions]
    counts = torch.bincount(owners, minlength=len(segments)).clamp(min=1)
    return LabelPositions(positions, next_label.flatten()[positions], owners, counts)


def chunked_segment_losses(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    segments: Sequence[Segment],
    by_token: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    where: LabelPositions | None = None,
) -> list[torch.Tensor]:
    """`segment_losses(head(hidden), labels, ...)` without the full logits: only positions that
    predict a label go through the output head, a chunk of rows at a time, and each chunk's logits
    are recomputed in backward instead of kept (the 150k-wide logits of Qwen2.5 would otherwise be
    the largest tensor of a step). `where` (from `label_positions`, made on the host) saves
    finding the labels on the device."""
    where = where if where is not None else label_positions(labels, segments, by_token)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where.positions)
    chunk = max(1, chunk_elements // head.out_features)
    count = where.positions.shape[0]
    per_token = [
        checkpoint(_token_losses, head, rows[i : i + chunk], where.targets[i : i + chunk], use_reentrant=False)
        for i in range(0, count, chunk)
    ]
    per_token = torch.cat(per_token) if per_token else hidden.new_zeros(0, dtype=loss_dtype(hidden.dtype))
    sums = torch.zeros(len(segments), dtype=per_token.dtype, device=per_token.device).index_add(
        0, where.owners, per_token
    )
    losses = sums / where.counts
    if count == 0:  # keep the graph connected to the hidden states
        losses = losses + hidden.sum() * 0
    return list(losses.unbind())


def _token_losses(head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(rows)
    return F.cross_entropy(logits.to(loss_dtype(logits.dtype)), targets, reduction="none")
