"""An adapter's endless, reproducible stream of micro-batches.

Epochs are concatenated: epoch e visits the examples in the permutation drawn from seed + e (or in
file order without shuffling), and a micro-batch simply takes the next indices, crossing an epoch
boundary when the data does not divide evenly. The whole state is one integer, `position`, so a
checkpoint can restore the stream exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.data.encode import Example


class ExampleStream:
    def __init__(self, examples: Sequence[Example], micro_batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.examples = list(examples)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # examples consumed since the start of training
        self._order: tuple[int, list[int]] | None = None

    @property
    def epoch(self) -> float:
        return self.position / len(self.examples)

    def next_micro_batch(self) -> list[Example]:
        batch = [self.examples[self._index(self.position + offset)] for offset in range(self.micro_batch_size)]
        self.position += self.micro_batch_size
        return batch

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._epoch_order(epoch))
        return self._order[1][offset]

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()
