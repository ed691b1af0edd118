"""Variable-length attention for packed batches, without flash-attn: `attention: varlen`.

A packed batch is one row holding many sequences back to back, each restarting its positions at
0. transformers keeps them apart with a block-diagonal mask, so SDPA still computes (and masks)
the full (total length)² score matrix: with mixed lengths most of that work is thrown away. This
attention function finds the sequences from the position ids and runs causal SDPA on each one
alone: attention costs Σ lengthᵢ² instead of (Σ lengthᵢ)², on any device, with the mask never
used. Anything that is not a packed row (padded batches, a cache in use) goes to transformers'
own SDPA path unchanged. flash-attn's varlen kernel (`attention: flash_attention_2`) does the same
in one launch on a GPU where it is installed.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAME = "lorafleet_varlen"
_bounds: tuple[weakref.ref, list[int]] | None = None  # the last position ids seen and their sequence starts


def register() -> str:
    """Make `attn_implementation="lorafleet_varlen"` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded batches still get SDPA's mask
    return NAME


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query/key/value (batch, heads, tokens, head_dim)
    in, (batch, tokens, heads, head_dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    starts = _sequence_starts(position_ids) if query.shape[0] == 1 and query.shape[2] == key.shape[2] else None
    if starts is None or len(starts) < 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    ends = [*starts[1:], query.shape[2]]
    groups = query.shape[1] // key.shape[1]
    dropout = dropout if module.training else 0.0
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            is_causal=True,
            scale=scaling,
            dropout_p=dropout,
            enable_gqa=groups > 1,
        )
        for start, end in zip(starts, ends, strict=True)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def _sequence_starts(position_ids: torch.Tensor | None) -> list[int] | None:
    """Token indices where a packed row's sequences start (position 0), read from the device once
    per forward pass: every layer gets the same position-ids tensor."""
    global _bounds
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    if _bounds is not None and _bounds[0]() is position_ids:
        return _bounds[1]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = None  # not a packed row from its first token: leave it to SDPA
    _bounds = (weakref.ref(position_ids), starts)
    return starts
