"""Which rows of a batch belong to which adapter: the one routing fact that data, adapters,
training and serving all share (so it lives below all of them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch belong to `adapter` (None: the base model alone); with
    `Routing.by_token`, tokens [start, end) of the flattened batch (packed sequences)."""

    adapter: str | None
    start: int
    end: int
