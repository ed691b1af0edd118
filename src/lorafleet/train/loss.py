"""Causal-LM loss per adapter segment: mean cross-entropy over that adapter's label tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorafleet.adapters.layer import Segment
from lorafleet.data.encode import IGNORE_INDEX


def segment_losses(
    logits: torch.Tensor, labels: torch.Tensor, segments: Sequence[Segment], by_token: bool = False
) -> list[torch.Tensor]:
    """Semantics: for each segment, CE(logits[s:e, t], labels[s:e, t+1]) averaged over label tokens;
    `by_token` (one packed row): CE(logits[0, t], labels[0, t+1]) for t in [s, e).

    Prompt, image and padding positions carry IGNORE_INDEX and count for nothing.
    """
    shift_logits = logits[:, :-1].float()
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
