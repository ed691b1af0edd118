"""Multi-adapter LoRA for training: every adapter at once, in the base's compute dtype.

`lora_delta_reference` (the plain twin, in layer.py) loops over segments in Python: two small
matmuls per adapter per projection and layer, four more in backward, and on a bf16 base a float32
copy of every projection's input kept for backward. On a GPU that loop, not the arithmetic, sets
the speed. Here one projection costs a handful of operations whatever the number of adapters:

- **equal blocks** (every adapter has the same number of rows, back to back, every one adapted
  here: the usual fleet step) — two batched matmuls over the adapters:
      low[k] = x[k] @ A_k.T · c_k        delta[k] = low[k] @ B_k.T
- **anything else** (unequal micro-batches, packed sequences, rows of adapters that do not target
  this projection, the padding tail of a packed row) — two dense matmuls against every adapter's
  features at once, with a per-row weight that is c_k on the row's own adapter's features and 0
  elsewhere (the inference path's `lora_delta_stacked`); it computes K times the LoRA arithmetic
  of the blocks above, a few percent of the base matmul for a handful of rank-16 adapters.

The adapters' weights stay float32 (the master copy the optimizer updates; float64 under a float64
base); they are stacked and cast to the input's dtype on every forward, so autograd hands gradients
in the masters' dtype back to each adapter's own parameters. This is what peft does under autocast
and torchtune does by default.
Ranks may differ: smaller ones are zero-padded to the largest, whose padding never contributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.reference import LoRAWeights
from lorafleet.segments import Segment


@dataclass(frozen=True)
class Layout:
    """How one projection's rows map onto the adapters it carries, for one routing."""

    names: tuple[str, ...]  # the adapters stacked, in stack order
    equal: bool  # one block of `rows // len(names)` rows per adapter, in stack order
    rank: int  # the largest rank: every adapter is padded to it
    slots: tuple[int, ...]  # per segment, its adapter's index in `names` (-1: not adapted here)
    lengths: tuple[int, ...]  # per segment, its rows


def plan(segments: tuple[Segment, ...], adapters: dict[str, LoRAWeights]) -> Layout:
    names = tuple(dict.fromkeys(s.adapter for s in segments if s.adapter in adapters))
    lengths = tuple(s.end - s.start for s in segments)
    slots = tuple(names.index(s.adapter) if s.adapter in adapters else -1 for s in segments)
    equal = (
        len(names) == len(segments)
        and len(set(lengths)) == 1
        and all(s.start == i * lengths[0] for i, s in enumerate(segments))
    )
    rank = max(adapters[name].lora_A.out_features for name in names)
    return Layout(names, equal, rank, slots, lengths)


def lora_delta_batched(
    x: torch.Tensor,
    segments: tuple[Segment, ...],
    adapters: dict[str, LoRAWeights],
    layout: Layout | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`lora_delta_reference(x, segments, adapters)` computed in x's dtype without a loop over adapters.

    `layout` (from `plan`) and, for layouts that are not equal blocks, `row_weights` (from
    `row_feature_weights`) may be passed in when cached; both depend only on the routing.
    """
    layout = layout or plan(segments, adapters)
    weights = [adapters[name] for name in layout.names]
    x_lora = _dropout(x, layout, weights)
    masters = [w.lora_A.weight for w in weights] + [w.lora_B.weight for w in weights]
    if layout.equal:
        blocks = x_lora.reshape(len(weights), -1, x.shape[-1])
        scalings = {w.scaling for w in weights}
        scaling = scalings.pop() if len(scalings) == 1 else _scaling_column(weights, blocks)
        delta = _EqualBlocks.apply(blocks, scaling, layout.rank, *masters)
    else:
        if row_weights is None:
            row_weights = row_feature_weights(layout, [w.scaling for w in weights], x.dtype, x.device)
        rows = x_lora.reshape(x.shape[0], -1, x.shape[-1])
        delta = _RowWeighted.apply(rows, row_weights, layout.rank, *masters)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


class _EqualBlocks(torch.autograd.Function):
    """delta[k] = (x[k] @ A_k.T · c_k) @ B_k.T for K equal blocks of rows, in x's dtype.

    Its own backward so that every adapter's gradient comes out as a contiguous slice of one
    batched result: autograd then hands those slices to the parameters as they are, where the
    gradients of a plain `bmm` against stacked weights come out transposed and autograd would copy
    each adapter's gradient for each parameter (one kernel per parameter per adapter per step)."""

    @staticmethod
    def forward(ctx, x, scaling, rank, *masters):
        count = len(masters) // 2
        a = torch.stack([_pad_rows(w, rank) for w in masters[:count]]).to(x.dtype)  # (K, r, in)
        b = torch.stack([_pad_cols(w, rank) for w in masters[count:]]).to(x.dtype)  # (K, out, r)
        low = torch.bmm(x, a.mT) * scaling  # (K, rows, r)
        ctx.save_for_backward(x, a, b, low, *([scaling] if torch.is_tensor(scaling) else []))
        ctx.scaling = None if torch.is_tensor(scaling) else scaling
        ctx.shapes, ctx.master_dtype = [tuple(w.shape) for w in masters], masters[0].dtype
        return torch.bmm(low, b.mT)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, low, *scaling = ctx.saved_tensors
        scaling = scaling[0] if scaling else ctx.scaling
        grad_low = torch.bmm(grad, b) * scaling  # gradient of x @ A.T, unscaled
        grad_x = torch.bmm(grad_low, a) if ctx.needs_input_grad[0] else None
        grad_a = torch.bmm(grad_low.mT, x)  # (K, r, in)
        grad_b = torch.bmm(grad.mT, low)  # (K, out, r)
        return grad_x, None, None, *_per_adapter(grad_a, grad_b, ctx.shapes, ctx.master_dtype)


class _RowWeighted(torch.autograd.Function):
    """delta = ((x @ A_cat.T) · w) @ B_cat: every row against every adapter's features, each row
    weighted by `row_feature_weights` (its own adapter's scaling, 0 elsewhere). x is (rows,
    tokens, in), w (rows, K·r). Its own backward for the same reason as `_EqualBlocks`."""

    @staticmethod
    def forward(ctx, x, row_weights, rank, *masters):
        count = len(masters) // 2
        a_cat = torch.cat([_pad_rows(w, rank) for w in masters[:count]]).to(x.dtype)  # (K·r, in)
        b_cat = torch.cat([_pad_cols(w, rank) for w in masters[count:]], dim=1).T.to(x.dtype)  # (K·r, out)
        low = (x @ a_cat.T) * row_weights[:, None, :]
        ctx.save_for_backward(x, row_weights, a_cat, b_cat, low)
        ctx.shapes, ctx.rank, ctx.master_dtype = [tuple(w.shape) for w in masters], rank, masters[0].dtype
        return low @ b_cat

    @staticmethod
    def backward(ctx, grad):
        x, row_weights, a_cat, b_cat, low = ctx.saved_tensors
        count, rank = len(ctx.shapes) // 2, ctx.rank
        grad_low = (grad @ b_cat.T) * row_weights[:, None, :]
        grad_x = grad_low @ a_cat if ctx.needs_input_grad[0] else None
        grad_a = (grad_low.reshape(-1, grad_low.shape[-1]).T @ x.reshape(-1, x.shape[-1])).view(count, rank, -1)
        grad_b_t = grad.reshape(-1, grad.shape[-1]).T @ low.reshape(-1, low.shape[-1])  # (out, K·r)
        grad_b = grad_b_t.view(grad_b_t.shape[0], count, rank).transpose(0, 1).contiguous()  # (K, out, r)
        return grad_x, None, None, *_per_adapter(grad_a, grad_b, ctx.shapes, ctx.master_dtype)


def _per_adapter(
    grad_a: torch.Tensor, grad_b: torch.Tensor, shapes: list[tuple], dtype: torch.dtype
) -> list[torch.Tensor]:
    """Each adapter's gradients from the stacked ones, in the masters' dtype: one cast per stack,
    then views (padding of smaller ranks cut off)."""
    count = len(shapes) // 2
    grad_a, grad_b = grad_a.to(dtype), grad_b.to(dtype)
    a = [g[: shape[0]] for g, shape in zip(grad_a.unbind(), shapes[:count], strict=True)]
    b = [g[:, : shape[1]] for g, shape in zip(grad_b.unbind(), shapes[count:], strict=True)]
    return a + b


def row_feature_weights(
    layout: Layout, scalings: list[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(rows, K·r): each row's weight on every stacked feature — its adapter's scaling on that
    adapter's r features, 0 elsewhere (and everywhere for rows not adapted here). Built on the host
    and copied once: it depends only on the routing, so callers cache it for a whole step."""
    # float64 on the host: a scaling such as 16/3 is rounded once, to `dtype`, not to float32 first
    per_slot = torch.zeros(len(layout.names) + 1, len(layout.names) * layout.rank, dtype=torch.float64)
    for index, scaling in enumerate(scalings):
        per_slot[index, index * layout.rank : (index + 1) * layout.rank] = scaling
    slots = torch.tensor(layout.slots).where(torch.tensor(layout.slots) >= 0, len(layout.names))
    rows = per_slot[torch.repeat_interleave(slots, torch.tensor(layout.lengths))]  # per_slot's last row: not adapted
    return rows.to(device=device, dtype=dtype)


def _dropout(x: torch.Tensor, layout: Layout, weights: list[LoRAWeights]) -> torch.Tensor:
    """x with each row's own adapter's LoRA dropout (x itself when no adapter drops anything)."""
    probabilities = [dropout_probability(w.dropout) for w in weights]
    if not any(probabilities):
        return x
    if layout.equal and len(set(probabilities)) == 1:
        return F.dropout(x, probabilities[0], training=True)
    pieces = torch.split(x, list(layout.lengths))
    return torch.cat(
        [weights[slot].dropout(piece) if slot >= 0 else piece for slot, piece in zip(layout.slots, pieces, strict=True)]
    )


def dropout_probability(dropout: nn.Module) -> float:
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _pad_rows(weight: torch.Tensor, rank: int) -> torch.Tensor:
    return weight if weight.shape[0] == rank else F.pad(weight, (0, 0, 0, rank - weight.shape[0]))


def _pad_cols(weight: torch.Tensor, rank: int) -> torch.Tensor:
    return weight if weight.shape[1] == rank else F.pad(weight, (0, rank - weight.shape[1]))


_SCALING_COLUMNS: dict[tuple, torch.Tensor] = {}


def _scaling_column(weights: list[LoRAWeights], like: torch.Tensor) -> torch.Tensor:
    """(K, 1, 1) scalings on the device, made once per distinct set (not copied on every forward)."""
    key = (tuple(w.scaling for w in weights), like.dtype, like.device)
    if key not in _SCALING_COLUMNS:
        if len(_SCALING_COLUMNS) > 64:
            _SCALING_COLUMNS.clear()
        _SCALING_COLUMNS[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)[:, None, None]
    return _SCALING_COLUMNS[key]
