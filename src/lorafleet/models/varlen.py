"""Variable-length attention for packed rows: `attention: varlen` (the default with packing).

A packed batch is one row holding many sequences back to back, each restarting its positions at
0. transformers keeps them apart with a block-diagonal mask, so SDPA computes (and masks) the
full (total length)² score matrix: with mixed lengths most of that work is thrown away. This
attention function runs causal attention on each sequence alone — Σ lengthᵢ² instead of
(Σ lengthᵢ)², the mask never built:

- on CUDA in bf16/fp16, one launch of PyTorch's own variable-length flash kernel
  (`torch.nn.attention.varlen.varlen_attn`, torch ≥ 2.10) over cumulative sequence offsets;
- elsewhere (CPU, fp32, an older torch), causal SDPA on each sequence in a Python loop: the
  reference the fast kernel is held to (tests/models/test_varlen.py, and on a GPU
  tests/train/test_gpu.py).

The sequence boundaries come from the trainer, computed on the host (`cu_seq_lens_q` and
`max_length_q` in the forward's keyword arguments, the names transformers' flash-attention
integration uses); without them they are read from the position ids, once per forward pass.
Anything else (a batch of several rows, a cache in use, cross-attention) goes to transformers'
own SDPA path unchanged.
"""

from __future__ import annotations

import inspect
import warnings
import weakref

import torch
import torch.nn.functional as F

from lorafleet.models.hf_compat import register_attention, sdpa_attention

NAME = "lorafleet_varlen"
_bounds: tuple[weakref.ref, list[int] | None] | None = None  # the last position ids seen and their sequence starts


def register() -> str:
    """Make `attn_implementation="lorafleet_varlen"` known to transformers; returns the name.

    No mask function is registered with it, so transformers builds no mask for it at all: neither
    the (total length)² block-diagonal one of a packed row, nor the packed-sequence detection that
    reads the position ids back from the device. This is a training kernel: rows are packed, or
    right-padded under plain causal attention (exact for every real token)."""
    register_attention(NAME, varlen_attention)
    return NAME


def sequence_offsets(lengths: list[int], device: torch.device) -> dict:
    """The keyword arguments that tell `varlen_attention` where a packed row's sequences are."""
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    offsets = offsets.to(device, non_blocking=True)
    longest = max(lengths)
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query/key/value (batch, heads, tokens, head_dim)
    in, (batch, tokens, heads, head_dim) out."""
    tokens = query.shape[2]
    self_attention = tokens == key.shape[2] and getattr(module, "is_causal", True)
    if self_attention and query.shape[0] == 1:
        offsets, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if offsets is None:
            starts = _sequence_starts(kwargs.get("position_ids"))
            if starts is not None and len(starts) > 1:
                bounds = [*starts, tokens]
                offsets, longest = bounds, max(e - s for s, e in zip(bounds, bounds[1:], strict=False))
        if offsets is not None:
            dropout = dropout if module.training else 0.0
            if dropout == 0.0 and _flash_varlen_usable(query):
                out = _flash_varlen(query, key, value, offsets, longest, scaling)
                if out is not None:
                    return out, None
            bounds = offsets.tolist() if torch.is_tensor(offsets) else offsets
            return _per_sequence(query, key, value, scaling, dropout, bounds)
    return sdpa_attention(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _per_sequence(query, key, value, scaling, dropout, bounds: list[int]):
    """Causal SDPA on each packed sequence alone: the reference."""
    out = query.new_empty(query.shape)
    groups = query.shape[1] // key.shape[1]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            out[:, :, start:end] = F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=scaling,
                dropout_p=dropout,
                enable_gqa=groups > 1,
            )
    return out.transpose(1, 2).contiguous(), None


_FLASH_VARLEN: dict = {}  # "fn": the kernel (or None), "kwargs": how this torch spells causal / GQA


def _flash_varlen_usable(query: torch.Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if "fn" not in _FLASH_VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # torch < 2.10
            varlen_attn = None
        _FLASH_VARLEN["fn"] = varlen_attn
        if varlen_attn is not None:
            parameters = inspect.signature(varlen_attn).parameters
            # torch 2.10 spells causal `is_causal=True`; later versions `window_size=(-1, 0)`.
            causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
            _FLASH_VARLEN["kwargs"] = causal
            _FLASH_VARLEN["gqa"] = "enable_gqa" in parameters
    return _FLASH_VARLEN["fn"] is not None


def _flash_varlen(query, key, value, offsets, longest, scaling):
    """One launch for every sequence; None (and the reference from then on) if the kernel refuses."""
    fn = _FLASH_VARLEN["fn"]
    if not torch.is_tensor(offsets):
        offsets = torch.tensor(offsets, dtype=torch.int32, device=query.device)
    kwargs = dict(_FLASH_VARLEN["kwargs"], scale=scaling)
    if _FLASH_VARLEN["gqa"] and key.shape[1] != query.shape[1]:
        kwargs["enable_gqa"] = True
    # (1, heads, tokens, dim) -> (tokens, heads, dim): views, the head dimension stays contiguous.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    try:
        out = fn(q, k, v, offsets, offsets, int(longest), int(longest), **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        warnings.warn(f"flash varlen attention unavailable ({err}); packing uses per-sequence SDPA", stacklevel=2)
        _FLASH_VARLEN["fn"] = None
        return None
    return out[None]


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
