"""One frozen `nn.Linear` carrying many LoRA adapters, each applied only to its own rows.

This is the heart of training a fleet together (the BatchLoRA idea): a batch is the concatenation
of every adapter's micro-batch along dim 0, the frozen base matmul runs once over all of it, and
each adapter's low-rank update runs only on its own segment of rows. Parameter names follow peft
(`base_layer`, `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`) so saved adapters need no
conversion. peft itself cannot do this: a peft model applies one active adapter (or one adapter
per row at inference, without gradients, and never DoRA), so we wrap the Linear ourselves.

Variants: rsLoRA is only another scaling (alpha / sqrt(rank)); a DoRA adapter is a LoRA adapter
whose rows are rescaled afterwards by its own per-feature scale (dora.py), so LoRA and DoRA
adapters share the same batched, fused and stacked paths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafleet.adapters import batched, dora, initial
from lorafleet.adapters.reference import LoRAWeights, lora_delta_stacked, slot_feature_mask
from lorafleet.errors import AdapterError
from lorafleet.segments import Segment

try:  # Triton ships with CUDA builds of PyTorch; without it the fused kernels are unavailable
    from lorafleet.adapters import fused
except ImportError:
    fused = None


class Routing:
    """Which rows go to which adapter; one instance is shared by every layer of a model.

    Adapters also have fleet-wide slot numbers (0: no adapter), which the gathered inference path
    uses to address every layer's stacked adapter weights by row.
    """

    def __init__(self) -> None:
        self._segments: tuple[Segment, ...] = ()
        self.by_token = False  # segments count flattened tokens (a packed batch), not rows
        # What every layer derives from the segments alone (batched-path layouts, row weights):
        # computed by the first layer that needs it, emptied whenever the segments change.
        self.step_cache: dict = {}
        self.slots: dict[str, int] = {}
        self.slots_version = 0
        self._row_slots: tuple[tuple, torch.Tensor] | None = None
        self.row_slots_version = 0  # bumped whenever row_slots changes, for caches keyed on it

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self._segments

    @segments.setter
    def segments(self, segments: tuple[Segment, ...]) -> None:
        self._segments = tuple(segments)
        self.step_cache = {}

    def row_slots(self, device: torch.device) -> torch.Tensor:
        """(rows,) long: each row's adapter slot, computed once per routing and device."""
        key = (self.segments, self.by_token, self.slots_version, device)
        if self._row_slots is None or self._row_slots[0] != key:
            slots = torch.tensor([self.slots.get(s.adapter, 0) for s in self.segments])
            lengths = torch.tensor([s.end - s.start for s in self.segments])
            self._row_slots = (key, torch.repeat_interleave(slots, lengths).to(device))
            self.row_slots_version += 1
        return self._row_slots[1]


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus any number of named LoRA adapters, routed by row segments."""

    def __init__(self, base_layer: nn.Linear, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.lora_initial = nn.ModuleDict()  # PiSSA / OLoRA adapters only: their frozen start
        self.scaling: dict[str, float] = {}
        self.routing = routing
        self._weights: dict[str, LoRAWeights] = {}  # rebuilt on add/remove: forward runs per token
        self._stack: tuple | None = None  # (key, a_cat, b_cat, r_max) for lora_delta_stacked
        self._mask: tuple | None = None  # (key, feature mask) for the current routing
        self._base_norms: torch.Tensor | None = None  # ||W_i||² for DoRA: the base is frozen
        self._dora_norms: tuple | None = None  # (key, norms) without gradients, while weights stay put

    def follow(self, routing: Routing) -> None:
        """Route by `routing` from now on: a base reused by a new fleet after the last one finished.
        The caches are keyed by the old routing's version counters, which the new one restarts."""
        self.routing = routing
        self._stack = self._mask = self._dora_norms = None

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
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
    ) -> None:
        """Attach adapter `name`, scaled alpha / rank (alpha / sqrt(rank) with rsLoRA), initialised
        as peft does: A Kaiming-uniform (`init: gaussian`: normal, std 1 / rank) and B zero, or
        with PiSSA / OLoRA both from the base's weight, kept apart from it (initial.py); with DoRA
        a magnitude vector set to the norms of W + s·B·A."""
        device = self.base_layer.weight.device
        lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        with torch.no_grad():
            if init in initial.FROM_THE_BASE:
                a0, b0 = initial.principal_factors(dora.dense_weight(self.base_layer), rank, self.scaling[name], init)
                lora_A.weight.copy_(a0)
                lora_B.weight.copy_(b0)
                self.lora_initial[name] = initial.Initial(a0.to(device, dtype), b0.to(device, dtype))
            else:
                lora_A.weight.copy_(_initial_a(lora_A.weight.shape, init, generator))
                lora_B.weight.zero_()
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._weights = self._collect_weights()
        if use_dora:
            self.lora_magnitude_vector[name] = dora.Magnitude(self._norms_reference(self._weights[name]))
            self._weights = self._collect_weights()

    def _norms_reference(self, weights: LoRAWeights) -> torch.Tensor:
        return dora.weight_norm_reference(dora.dense_weight(self.base_layer), weights)

    def remove_adapter(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector, self.lora_initial):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        self._weights = self._collect_weights()

    def adapter_weights(self) -> dict[str, LoRAWeights]:
        return self._weights

    def _collect_weights(self) -> dict[str, LoRAWeights]:
        return {
            name: LoRAWeights(
                *self._factors(name),
                self.lora_dropout[name],
                self.scaling[name],
                self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None,
            )
            for name in self.lora_A
        }

    def _factors(self, name: str) -> tuple:
        """A and B as the maths uses them: the trained ones, or with an initial part kept apart
        from the base (PiSSA, OLoRA: initial.Combined)."""
        if name not in self.lora_initial:
            return self.lora_A[name], self.lora_B[name]
        kept = self.lora_initial[name]
        return initial.Combined(self.lora_A[name], kept, "lora_A"), initial.Combined(self.lora_B[name], kept, "lora_B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        segments = self.routing.segments
        if not any(segment.adapter in self._weights for segment in segments):
            return result
        if self.routing.by_token:  # a packed batch: each token is a "row" of the segment maths
            x = x.reshape(-1, 1, x.shape[-1])
        if torch.is_grad_enabled() and self._fusable(segments, x.device):  # opt-in Triton kernels
            delta = fused.fused_lora_delta(x, segments, self._weights)
        elif torch.is_grad_enabled():  # training: every adapter at once, in x's dtype
            layout, row_weights = self._training_layout(segments, x.dtype, x.device)
            delta = batched.lora_delta_batched(x, segments, self._weights, layout, row_weights)
        else:  # inference: two dense matmuls whatever the number of adapters
            a_cat, b_cat, r_max = self.stacked_weights()
            mask = self._feature_mask(r_max, a_cat.shape[0] // r_max, a_cat.dtype, x.device)
            delta = lora_delta_stacked(x, mask, a_cat, b_cat)
        delta = delta.view(result.shape)
        if self.lora_magnitude_vector and any(s.adapter in self.lora_magnitude_vector for s in segments):
            return self._rescaled(result, delta, segments)
        return result + delta if delta.dtype == result.dtype else (result + delta).to(result.dtype)

    def _rescaled(self, result: torch.Tensor, delta: torch.Tensor, segments: tuple[Segment, ...]) -> torch.Tensor:
        """The output with each DoRA adapter's rows rescaled by its m / ||W + s·B·A|| (dora.py);
        every other row is result + delta exactly."""
        dtype = next(iter(self.lora_magnitude_vector.values())).weight.dtype  # the masters'
        names, row_choice = self._dora_rows(segments, result.device, dtype)
        weights = [self._weights[name] for name in names]
        if torch.is_grad_enabled() and any(batched.dropout_probability(w.dropout) for w in weights):
            raise AdapterError(
                f"DoRA adapter {names[0]!r} has dropout: peft applies it to DoRA's base term too, which "
                "lorafleet does not; train DoRA adapters with dropout: 0"
            )
        table = dora.scale_table([w.magnitude for w in weights], self._dora_weight_norms(names, weights))
        # (rows, 1, out): each row its own adapter's; a one-hot matmul, whose backward is another
        # (a gather's backward scatters, with atomics on a GPU and slowly on a CPU)
        scale = (row_choice @ table)[:, None, :]
        by_row = (row_choice.shape[0], -1, result.shape[-1])
        out = dora.rescale_rows(result.view(by_row), self.base_layer.bias, delta.view(by_row), scale)
        return out.view(result.shape)

    def _dora_rows(
        self, segments: tuple[Segment, ...], device: torch.device, dtype: torch.dtype
    ) -> tuple[tuple[str, ...], torch.Tensor]:
        """The DoRA adapters routed here and, per row (per token when routing by token), which row
        of `dora.scale_table` it takes, one-hot (rows, K + 1): its adapter's, or the last (scale 1).
        Built once per routing and shared by every layer carrying the same DoRA adapters."""
        names = tuple(dict.fromkeys(s.adapter for s in segments if s.adapter in self.lora_magnitude_vector))
        key = ("dora", names, device, dtype)
        cache = self.routing.step_cache
        if key not in cache:
            index = [names.index(s.adapter) if s.adapter in names else len(names) for s in segments]
            lengths = [s.end - s.start for s in segments]
            rows = torch.repeat_interleave(torch.tensor(index), torch.tensor(lengths))
            cache[key] = names, torch.nn.functional.one_hot(rows, len(names) + 1).to(device=device, dtype=dtype)
        return cache[key]

    def _dora_weight_norms(self, names: tuple[str, ...], weights: list[LoRAWeights]) -> torch.Tensor:
        """(K, out) ||W + s·B·A|| per DoRA adapter; kept between forwards without gradients (eval,
        serving) until a weight changes."""
        weight = dora.dense_weight(self.base_layer)
        dtype = weights[0].lora_A.weight.dtype
        if self._base_norms is None or self._base_norms.dtype != dtype or self._base_norms.device != weight.device:
            self._base_norms = dora.row_norms_squared(weight, dtype)
        if torch.is_grad_enabled():
            return dora.weight_norms(weight, self._base_norms, weights)
        versions = tuple(initial.weight_version(f) for w in weights for f in (w.lora_A, w.lora_B))
        key = (names, self.routing.slots_version, versions)
        if self._dora_norms is None or self._dora_norms[0] != key:
            self._dora_norms = (key, dora.weight_norms(weight, self._base_norms, weights))
        return self._dora_norms[1]

    def dora_scales(self) -> dict[str, torch.Tensor]:
        """Each DoRA adapter's scale m / ||W + s·B·A|| (out,), without gradients: what a server
        precomputes when it loads the adapter."""
        names = tuple(self.lora_magnitude_vector)
        if not names:
            return {}
        with torch.no_grad():
            weights = [self._weights[name] for name in names]
            norms = self._dora_weight_norms(names, weights)
            return {name: w.magnitude / norm for name, w, norm in zip(names, weights, norms, strict=True)}

    def _training_layout(
        self, segments: tuple[Segment, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[batched.Layout, torch.Tensor | None]:
        """The batched path's layout and row weights for this routing, shared by every layer that
        carries the same adapters (a step builds them once, not once per layer)."""
        carried = tuple(
            (s.adapter, self._weights[s.adapter].lora_A.out_features, self._weights[s.adapter].scaling)
            for s in segments
            if s.adapter in self._weights
        )
        key = ("batched", carried, dtype, device)
        cache = self.routing.step_cache
        if key not in cache:
            layout = batched.plan(segments, self._weights)
            scalings = [self._weights[name].scaling for name in layout.names]
            row_weights = None if layout.equal else batched.row_feature_weights(layout, scalings, dtype, device)
            cache[key] = (layout, row_weights)
        return cache[key]

    def _fusable(self, segments: tuple[Segment, ...], device: torch.device) -> bool:
        """The fused Triton kernels serve this step: available, enabled for the device, no dropout."""
        if fused is None or not fused.is_enabled(device):
            return False
        return all(
            isinstance(self._weights[s.adapter].dropout, nn.Identity) for s in segments if s.adapter in self._weights
        )

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(a_cat, b_cat, r_max) for `lora_delta_stacked`; rebuilt when adapters or weights change."""
        versions = tuple(
            (n, initial.weight_version(w.lora_A), initial.weight_version(w.lora_B)) for n, w in self._weights.items()
        )
        key = (self.routing.slots_version, versions)
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, *self._build_stack())
        return self._stack[1], self._stack[2], self._stack[3]

    def _build_stack(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        slots = self.routing.slots
        r_max = max(w.lora_A.out_features for w in self._weights.values())
        count = max(slots.values(), default=1)
        reference = next(iter(self._weights.values())).lora_A.weight
        a_cat = reference.new_zeros(count * r_max, self.in_features)
        b_cat = reference.new_zeros(count * r_max, self.out_features)
        with torch.no_grad():
            for name, weights in self._weights.items():
                start, rank = (slots[name] - 1) * r_max, weights.lora_A.out_features
                a_cat[start : start + rank] = weights.lora_A.weight
                b_cat[start : start + rank] = weights.lora_B.weight.T * weights.scaling
        return a_cat, b_cat, r_max

    def _feature_mask(self, r_max: int, slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        row_slots = self.routing.row_slots(device)
        key = (self.routing.row_slots_version, r_max, slots, dtype)
        if self._mask is None or self._mask[0] != key:
            self._mask = (key, slot_feature_mask(row_slots, slots, r_max, dtype))
        return self._mask[1]


def _initial_a(shape: torch.Size, init: str, generator: torch.Generator | None) -> torch.Tensor:
    """A as peft initialises it, drawn from `generator`: Kaiming-uniform (a = sqrt(5), as
    nn.Linear and peft's default), or normal with std 1 / rank (peft's "gaussian")."""
    if init == "gaussian":
        return torch.randn(shape, generator=generator) / shape[0]
    bound = 1 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * 2 * bound - bound
