"""Every adapter of the fleet stacked per projection group, at fixed addresses, for the decode step.

The static decode step (`decode.py`) cannot loop over adapters: each row has its own, and a
captured CUDA graph needs every weight at one address for the server's lifetime. So each group of
projections that reads the same input keeps all adapters in a few buffers, addressed by fleet slot
(vLLM's stacked LoRA weights), and each row keeps only its own slot's features. Plain twin: the
model's own forward through `MultiLoRALinear` (tests/serve/test_decode.py holds the step to it).

DoRA adapters (adapters/dora.py) decode in the same step: their per-feature scale
g = m / ||W + s·B·A|| is fixed while an adapter is loaded, so it is computed once when the stacks
are refreshed and kept, per projection, in a table addressed by slot like the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.layer import MultiLoRALinear


class ProjectionGroup:
    """Projections that read the same input (q/k/v; o; gate/up; down), with every adapter of the
    fleet, in few operations at fixed addresses:

        z = x @ [W_1; ...; W_m; A].T + [bias; 0]      every base output and every adapter feature
        y_j = z_j + where(own, z_A,j, 0) @ B_j        B_j: (capacity · rank, out_j), scaling folded in

    A holds, per projection, every fleet slot's A (slot s in block s-1, zero past its rank); `own`
    (rows, capacity · rank) keeps each row's own slot's features. With `fuse_weights` the base
    weights move into the same buffer as A (the modules keep working: their weights become views of
    it, nothing is duplicated), so the base matmuls and the shrink are one matmul; otherwise (a
    quantized base, or a model the caller keeps using elsewhere) the bases run as they are.
    Buffers are sized for `capacity` slots of the largest rank seen and rewritten in place when
    adapters change, so captured graphs stay valid; they grow (and `version` changes, so graphs
    are captured again) only when a slot or rank beyond them arrives.

    DoRA: once a DoRA adapter is loaded, each projection j also keeps (capacity + 1, out_j)
    tables by slot, the scale g and the offset (1 - g)·bias (1 and 0 for every other slot and the
    base), and every row's output becomes (z_j + lora_j)·g + (1 - g)·bias = g·(W·x + lora) + bias:
    peft's DoRA output. Rows of LoRA adapters and the base are multiplied by 1 and offset by 0."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], dtype, device, fuse_weights: bool) -> None:
        self.parent, self.names, self.dtype, self.device = parent, names, dtype, device
        bases = self.bases()
        self.fused = fuse_weights and all(type(b) is nn.Linear and b.weight.dtype == dtype for b in bases)
        self.splits = [b.out_features for b in bases]
        self.base_rows = sum(self.splits) if self.fused else 0
        self.weight: torch.Tensor | None = None  # [W_1; ...; W_m; A] (fused) or A alone
        self.bias: torch.Tensor | None = None  # [bias; 0] (fused, when any base has a bias)
        self.b: list[torch.Tensor] = []
        self.dora_scale: list[torch.Tensor] = []  # per projection (capacity + 1, out): g by slot
        self.dora_offset: list[torch.Tensor] = []  # per projection (capacity + 1, out): (1 - g)·bias
        self.capacity = self.rank = 0
        self.version = 0
        if self.fused:
            self._allocate(rank=0, capacity=0)

    def modules(self) -> list[nn.Module]:
        return [getattr(self.parent, name) for name in self.names]

    def bases(self) -> list[nn.Module]:
        return [m.base_layer if isinstance(m, MultiLoRALinear) else m for m in self.modules()]

    @property
    def features(self) -> int:
        return self.capacity * self.rank

    def refresh(self, slots: dict[str, int], slot_capacity: int) -> None:
        """Make the buffers hold the fleet's adapters as they are now."""
        weights = [m.adapter_weights() if isinstance(m, MultiLoRALinear) else {} for m in self.modules()]
        rank = max((w.lora_A.out_features for table in weights for w in table.values()), default=0)
        if rank > self.rank or (rank and slot_capacity > self.capacity):
            self._allocate(max(rank, self.rank), max(slot_capacity, self.capacity))
        if not self.features:
            return
        with torch.no_grad():
            adapters = self.weight[self.base_rows :]
            adapters.zero_()
            for b in self.b:
                b.zero_()
            for index, table in enumerate(weights):
                for name, w in table.items():
                    start = (slots[name] - 1) * self.rank
                    rank_here = w.lora_A.out_features
                    row = index * self.features + start
                    adapters[row : row + rank_here] = w.lora_A.weight
                    self.b[index][start : start + rank_here] = w.lora_B.weight.T * w.scaling
        self._refresh_dora(slots)

    def _refresh_dora(self, slots: dict[str, int]) -> None:
        """Each DoRA adapter's scale and offset into its slot's row of the tables (allocated, and
        `version` bumped, when the first DoRA adapter arrives or the capacity grew)."""
        modules = [m for m in self.modules() if isinstance(m, MultiLoRALinear)]
        if not self.dora_scale and not any(m.lora_magnitude_vector for m in modules):
            return
        if not self.dora_scale or self.dora_scale[0].shape[0] != self.capacity + 1:
            ones = lambda out: torch.ones(self.capacity + 1, out, dtype=self.dtype, device=self.device)  # noqa: E731
            self.dora_scale = [ones(out) for out in self.splits]
            self.dora_offset = [torch.zeros_like(scale) for scale in self.dora_scale]
            self.version += 1
        with torch.no_grad():
            for module, base, scale, offset in zip(
                self.modules(), self.bases(), self.dora_scale, self.dora_offset, strict=True
            ):
                scale.fill_(1)
                offset.zero_()
                if not isinstance(module, MultiLoRALinear):
                    continue
                for name, g in module.dora_scales().items():
                    scale[slots[name]] = g
                    if base.bias is not None:
                        offset[slots[name]] = (1 - g) * base.bias

    def _allocate(self, rank: int, capacity: int) -> None:
        bases = self.bases()
        in_features, groups = bases[0].in_features, len(bases)
        zeros = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        weight = zeros(self.base_rows + groups * capacity * rank, in_features)
        if self.fused:  # the base weights move into the new buffer; the modules see views of it
            bias = None
            if any(b.bias is not None for b in bases):
                bias = zeros(weight.shape[0])
            with torch.no_grad():
                row = 0
                for base in bases:
                    weight[row : row + base.out_features] = base.weight
                    base.weight = nn.Parameter(weight[row : row + base.out_features], requires_grad=False)
                    if base.bias is not None:
                        bias[row : row + base.out_features] = base.bias
                        base.bias = nn.Parameter(bias[row : row + base.out_features], requires_grad=False)
                    row += base.out_features
            self.bias = bias
        self.weight = weight
        self.rank, self.capacity = rank, capacity
        self.b = [zeros(capacity * rank, out) for out in self.splits]
        self.version += 1

    def __call__(self, x: torch.Tensor, owners: RowOwners) -> list[torch.Tensor]:
        if self.fused:
            z = F.linear(x, self.weight, self.bias)
            outputs = list(z[..., : self.base_rows].split(self.splits, dim=-1))
            low = z[..., self.base_rows :]
        else:
            outputs = [base(x) for base in self.bases()]
            low = F.linear(x.to(self.dtype), self.weight) if self.features else None
        if not self.features:
            return outputs
        own = owners.mask(self.capacity, self.rank)  # (rows, 1, features)
        low = low.unflatten(-1, (len(self.splits), self.features))
        # where, not a multiply: an overflow in another adapter's features must not reach this row
        low = torch.where(own[..., None, :], low, 0)
        pairs = zip(outputs, self.b, strict=True)
        outputs = [out + (low[..., j, :] @ b).to(out.dtype) for j, (out, b) in enumerate(pairs)]
        if not self.dora_scale:
            return outputs
        slots = owners.row_slots
        tables = zip(outputs, self.dora_scale, self.dora_offset, strict=True)
        return [out * scale[slots][:, None, :] + offset[slots][:, None, :] for out, scale, offset in tables]


class RowOwners:
    """Which stacked adapter features belong to each row, for one step: (rows, 1, capacity·rank)
    masks, made once per step for each stack layout and shared by every layer."""

    def __init__(self, row_slots: torch.Tensor) -> None:
        self.row_slots, self._masks = row_slots, {}

    def mask(self, capacity: int, rank: int) -> torch.Tensor:
        if (capacity, rank) not in self._masks:
            owner = torch.arange(capacity * rank, device=self.row_slots.device) // rank + 1
            self._masks[capacity, rank] = (owner[None, :] == self.row_slots[:, None])[:, None, :]
        return self._masks[capacity, rank]


def capacity_for(slots: int) -> int:
    """Adapter slots the stacks hold: the next power of two (at least 4), so that loading adapters
    one by one reallocates (and captures graphs again) only a few times."""
    capacity = 4
    while capacity < slots:
        capacity *= 2
    return capacity
