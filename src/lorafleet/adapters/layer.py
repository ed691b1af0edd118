"""One frozen `nn.Linear` carrying many LoRA adapters, each applied only to its own rows.

This is the heart of training a fleet together (the BatchLoRA idea): a batch is the concatenation
of every adapter's micro-batch along dim 0, the frozen base matmul runs once over all of it, and
each adapter's low-rank update runs only on its own segment of rows. Parameter names follow peft
(`base_layer`, `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`) so saved adapters need no
conversion. peft itself cannot do this: a peft model applies one active adapter (or one adapter
per row at inference, without gradients), so we wrap the Linear ourselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch belong to `adapter` (None: the base model alone)."""

    adapter: str | None
    start: int
    end: int


class Routing:
    """Which rows go to which adapter; one instance is shared by every layer of a model."""

    def __init__(self) -> None:
        self.segments: tuple[Segment, ...] = ()


@dataclass
class LoRAWeights:
    """The trainable part of one adapter on one layer."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    dropout: nn.Module
    scaling: float


def lora_delta_reference(
    x: torch.Tensor, segments: tuple[Segment, ...], adapters: dict[str, LoRAWeights]
) -> torch.Tensor:
    """The LoRA update of a multi-adapter batch, in plain PyTorch.

    Semantics: x is (rows, ..., in_features); for every segment whose adapter is in `adapters`,
    delta[s:e] = B(A(dropout(x[s:e])) * scaling), computed in the adapter's dtype; other rows get 0.
    Returns (rows, ..., out_features). A fused kernel replacing this must match it.
    """
    dtype = weights_dtype(adapters)
    out_features = next(iter(adapters.values())).lora_B.out_features
    # split (not slicing) so that backward assembles grad_x with one cat instead of one
    # zero-filled full-size tensor per segment; scaling on the rank-r side is the cheap side.
    pieces = []
    for segment, rows in zip(segments, torch.split(x, [s.end - s.start for s in segments]), strict=True):
        weights = adapters.get(segment.adapter) if segment.adapter is not None else None
        if weights is None:
            pieces.append(rows.new_zeros(*rows.shape[:-1], out_features, dtype=dtype))
            continue
        low_rank = weights.lora_A(weights.dropout(rows if rows.dtype == dtype else rows.to(dtype)))
        pieces.append(weights.lora_B(low_rank * weights.scaling))
    return torch.cat(pieces, dim=0)


def weights_dtype(adapters: dict[str, LoRAWeights]) -> torch.dtype:
    return next(iter(adapters.values())).lora_A.weight.dtype


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus any number of named LoRA adapters, routed by row segments."""

    def __init__(self, base_layer: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.routing = routing
        self._weights: dict[str, LoRAWeights] = {}  # rebuilt on add/remove: forward runs per token

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `.weight.dtype` of projections
        return self.base_layer.weight

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dropout: float,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Attach adapter `name`: A as peft initialises it (Kaiming uniform), B zero."""
        device = self.base_layer.weight.device
        lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) as in nn.Linear / peft
            lora_A.weight.copy_(torch.rand(lora_A.weight.shape, generator=generator) * 2 * bound - bound)
            lora_B.weight.zero_()
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / rank
        self._weights = self._collect_weights()

    def remove_adapter(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        self._weights = self._collect_weights()

    def adapter_weights(self) -> dict[str, LoRAWeights]:
        return self._weights

    def _collect_weights(self) -> dict[str, LoRAWeights]:
        return {
            name: LoRAWeights(self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name])
            for name in self.lora_A
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        segments = self.routing.segments
        if not any(segment.adapter in self._weights for segment in segments):
            return result
        delta = lora_delta_reference(x, segments, self._weights)
        return result + delta if delta.dtype == result.dtype else (result + delta).to(result.dtype)
