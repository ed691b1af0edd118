"""The reference maths of multi-adapter LoRA, in plain PyTorch.

Every faster path is held to these functions by the tests: `lora_delta_reference` for training
(the batched path in batched.py, the Triton kernels in fused.py) and `lora_delta_stacked` for
inference. Nothing here imports the layer or the kernels; they import this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafleet.segments import Segment


@dataclass
class LoRAWeights:
    """The trainable part of one adapter on one layer."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    dropout: nn.Module
    scaling: float
    magnitude: nn.Parameter | None = None  # DoRA's magnitude vector (out,); None for plain LoRA


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


def lora_delta_stacked(
    x: torch.Tensor, feature_mask: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor
) -> torch.Tensor:
    """The same update for inference, every adapter at once: two dense matmuls, no Python loop.

    Semantics: with S slots of r_max features each, a_cat is (S * r_max, in) holding slot s's A in
    rows [(s-1)*r_max, s*r_max) (zero past its rank), b_cat is (S * r_max, out) holding its
    scaling * B.T in the same rows, and feature_mask (rows, S * r_max) is 1 on the features of the
    row's own slot (`slot_feature_mask`). Then delta[i] = x[i] @ A_s.T @ B_s.T * scaling_s for the
    row's adapter s (0 for none): `lora_delta_reference` without dropout. (Training passes B.T
    unscaled and puts each slot's scaling into the mask instead: the same product.) Projecting every row on
    every adapter costs S * r_max / out of the base matmul, a few percent for a handful of rank-16
    adapters, and beats both a per-adapter loop and gathering weights per row.
    """
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1]).to(a_cat.dtype)
    low_rank = (flat @ a_cat.T) * feature_mask[:, None, :]  # (rows, tokens, S * r_max)
    return (low_rank @ b_cat).reshape(*x.shape[:-1], b_cat.shape[1])


def slot_feature_mask(row_slots: torch.Tensor, slots: int, r_max: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, slots * r_max): 1 where feature j belongs to the row's slot (slot s owns block s-1)."""
    owner = torch.arange(slots * r_max, device=row_slots.device) // r_max + 1
    return (owner[None, :] == row_slots[:, None]).to(dtype)


def weights_dtype(adapters: dict[str, LoRAWeights]) -> torch.dtype:
    return next(iter(adapters.values())).lora_A.weight.dtype
