"""Variable-length attention without flash-attn: `attention: varlen`.

A packed batch is one row holding many sequences back to back, each restarting its positions at
0. transformers keeps them apart with a block-diagonal mask, so SDPA still computes (and masks)
the full (total length)² score matrix: with mixed lengths most of that work is thrown away. This
attention function finds the sequences from the position ids and runs causal SDPA on each one
alone: attention costs Σ lengthᵢ² instead of (Σ lengthᵢ)², on any device, with the mask never
used. A right-padded batch is handled the same way, each row's real tokens alone (its length read
from the mask once per forward). Anything else (left padding, a cache in use, cross-attention)
goes to transformers' own SDPA path unchanged. flash-attn's varlen kernel (`attention: flash_attention_2`) does the same
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

    tokens = query.shape[2]
    self_attention = tokens == key.shape[2] and getattr(module, "is_causal", True)
    if self_attention and query.shape[0] == 1:
        starts = _sequence_starts(kwargs.get("position_ids"))
        if starts is not None and len(starts) > 1:
            return _per_span(
                module, query, key, value, scaling, dropout, [(0, s, e) for s, e in _spans(starts, tokens)]
            )
    if self_attention and query.shape[0] > 1 and attention_mask is not None:
        lengths = _right_padded_lengths(attention_mask)
        if lengths is not None:
            return _per_span(module, query, key, value, scaling, dropout, [(r, 0, n) for r, n in enumerate(lengths)])
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _per_span(module, query, key, value, scaling, dropout, spans: list[tuple[int, int, int]]):
    """Causal SDPA on each (row, start, end) span alone; positions outside every span get 0
    (padding, whose outputs no real token ever reads)."""
    out = query.new_zeros(query.shape)
    groups = query.shape[1] // key.shape[1]
    dropout = dropout if module.training else 0.0
    for row, start, end in spans:
        if end > start:
            out[row : row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                is_causal=True,
                scale=scaling,
                dropout_p=dropout,
                enable_gqa=groups > 1,
            )
    return out.transpose(1, 2).contiguous(), None


def _spans(starts: list[int], tokens: int) -> list[tuple[int, int]]:
    return list(zip(starts, [*starts[1:], tokens], strict=True))


_lengths: tuple[weakref.ref, list[int] | None] | None = None  # the last mask seen and its row lengths


def _right_padded_lengths(mask: torch.Tensor) -> list[int] | None:
    """Each row's real length when the 4-D mask is causal over a right-padded batch (real keys a
    prefix of the row); None for anything else, which then goes to plain SDPA."""
    global _lengths
    if _lengths is not None and _lengths[0]() is mask:
        return _lengths[1]
    lengths = None
    if mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1] == 1:
        visible = mask[:, 0, -1, :]  # the last query sees every real key of its row
        counts = visible.sum(dim=-1)
        prefix = torch.arange(visible.shape[-1], device=mask.device)[None, :] < counts[:, None]
        if torch.equal(visible, prefix):
            lengths = counts.tolist()
    _lengths = (weakref.ref(mask), lengths)
    return lengths


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
