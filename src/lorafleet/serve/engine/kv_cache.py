"""A KV cache with static shapes: preallocated once, rows by slot, nothing ever resized or moved.

Per layer, keys and values are one tensor each of shape (slots + 1, kv_heads, capacity, head_dim).
A request takes a free slot when it is admitted and gives it back when it retires: no `cat` when a
row joins, no per-layer copy when one leaves, and every tensor address stays fixed, which is what
a captured CUDA graph needs (it replays on the same memory). The extra last slot is scratch: the
padding rows of a batch bucket point at it (position 0), so a graph for 8 rows serves 5.

Positions live on the host (`lengths`): sizing a step never waits for the device. A decode step
writes each row's new key/value at its own position and attends over the first `span` positions
of its own slot, `span` a power-of-two bucket of the longest row, so that the number of distinct
shapes (and graphs) stays small while short batches do not read the whole capacity.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots + 1, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.capacity = slots, capacity
        self.scratch = slots  # the padding rows' slot
        self.lengths = [0] * (slots + 1)  # tokens held per slot, on the host
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest slot first

    @classmethod
    def for_model(cls, language_model, slots: int, capacity: int, dtype: torch.dtype, device) -> SlotKVCache:
        attention = language_model.layers[0].self_attn
        config = language_model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(len(language_model.layers), slots, kv_heads, attention.head_dim, capacity, dtype, device)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot: admit at most `slots` rows")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def write_prompts(self, slots: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]):
        """Store prefilled keys/values (per layer (rows, kv_heads, length, head_dim), right-padded)
        in the rows' slots: one copy per layer for the whole admitted batch."""
        length = keys[0].shape[2]
        if length > self.capacity:
            raise ValueError(f"a prompt of {length} tokens exceeds the KV cache's capacity of {self.capacity}")
        index = torch.tensor(slots, device=self.keys[0].device)
        for cache, new in zip(self.keys, keys, strict=True):
            cache[index, :, :length] = new.to(cache.dtype)
        for cache, new in zip(self.values, values, strict=True):
            cache[index, :, :length] = new.to(cache.dtype)
        for slot, count in zip(slots, lengths, strict=True):
            self.lengths[slot] = count

    def span(self, slots: list[int], floor: int = 16) -> int:
        """The attention span of a decode step over `slots`: the longest row after this token,
        rounded up to a power of two (at least `floor`, at most the capacity)."""
        needed = max(self.lengths[slot] for slot in slots) + 1
        if needed > self.capacity:
            raise ValueError(f"a row would exceed the KV cache's capacity of {self.capacity} tokens")
        span = floor
        while span < needed:
            span *= 2
        return min(span, self.capacity)

    def advance(self, slots: list[int]) -> None:
        """Each row of a decode step holds one token more."""
        for slot in slots:
            self.lengths[slot] += 1
