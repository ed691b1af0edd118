"""A lean decode step over the model's own modules, with a KV cache that has no padding.

transformers' forward rebuilds attention masks, cache objects and output records on every call,
which dominates a decode step for a batch of single tokens (measured: a 1-row step cost half a
32-row one on CPU). For decoder layers of the Llama/Qwen2/Qwen3 shape we run the step ourselves,
gpt-fast style, calling the model's own submodules (so LoRA-wrapped projections, RMSNorm and the
rotary embedding are exactly the model's): embed → per layer [norm → q/k/v → rope → write the new
key/value at each row's length → attention over each row's own prefix → o_proj → norm → MLP] →
norm → lm_head. Each row's keys sit at positions [0, length) of its cache row, so the attention
mask is a length comparison and nothing is ever left-padded.

Prefill stays with transformers (it handles images and is one call per arrival, not per token):
`prefill` runs the inner model on right-padded prompts and hands back each row's last hidden
state and its keys/values, already in this layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from lorafleet.data.batch import collate
from lorafleet.errors import ModelLoadError
from lorafleet.models.loading import BaseModel

SUPPORTED_LAYERS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")


def check_supported(base: BaseModel) -> None:
    lm = base.language_model
    kinds = {type(layer).__name__ for layer in lm.layers}
    unsupported = kinds - set(SUPPORTED_LAYERS)
    sliding = [i for i, layer in enumerate(lm.layers) if getattr(layer.self_attn, "sliding_window", None)]
    if unsupported or sliding:
        reason = f"decoder layers {sorted(unsupported)}" if unsupported else "sliding-window attention"
        raise ModelLoadError(
            f"{base.path}: the local engine does not support {reason} yet "
            f"(supported: {', '.join(SUPPORTED_LAYERS)}); serve this model with --engine vllm"
        )


class KVCache:
    """Per layer, keys and values of shape (rows, kv_heads, capacity, head_dim); row i is valid
    on [0, lengths[i]). Capacity grows by doubling; rows come and go with the batch."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor) -> None:
        self.keys, self.values, self.lengths = keys, values, lengths

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.keys[0].shape[2]
        if needed > capacity:
            self._resize(max(needed, 2 * capacity))

    def _resize(self, capacity: int) -> None:
        grow = lambda t: F.pad(t, (0, 0, 0, capacity - t.shape[2]))  # noqa: E731
        self.keys = [grow(k) for k in self.keys]
        self.values = [grow(v) for v in self.values]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows`, in that order, and drop capacity nobody needs any more."""
        self.lengths = self.lengths[rows]
        used = int(self.lengths.max()) + 1 if self.lengths.numel() else 1
        self.keys = [k[rows, :, :used] for k in self.keys]
        self.values = [v[rows, :, :used] for v in self.values]

    def extend(self, other: KVCache) -> None:
        """Append the rows of `other` after ours."""
        capacity = max(self.keys[0].shape[2], other.keys[0].shape[2])
        self._resize(capacity)
        other._resize(capacity)
        self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, other.keys, strict=True)]
        self.values = [torch.cat([a, b]) for a, b in zip(self.values, other.values, strict=True)]
        self.lengths = torch.cat([self.lengths, other.lengths])


@torch.no_grad()
def prefill(base: BaseModel, prompts: list, device: torch.device) -> tuple[torch.Tensor, KVCache]:
    """Run the prompts (right-padded) through the model: last-token logits (rows, vocab) and the cache."""
    batch = collate(prompts, base.tokenizer.pad_token_id).to(device)
    inputs = batch.model_inputs()
    lengths = batch.attention_mask.sum(dim=1)
    output = base.model.model(**inputs, past_key_values=DynamicCache(), use_cache=True)
    last = output.last_hidden_state[torch.arange(len(prompts), device=device), lengths - 1]
    logits = base.model.get_output_embeddings()(last).float()
    layers = output.past_key_values.layers
    cache = KVCache([layer.keys for layer in layers], [layer.values for layer in layers], lengths)
    return logits, cache


class Decoder:
    """One decode step for every row: the model's modules, our cache, no transformers forward."""

    def __init__(self, base: BaseModel) -> None:
        check_supported(base)
        lm = base.language_model
        self.embed, self.layers, self.norm, self.rotary = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = base.model.get_output_embeddings()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens (rows,) at positions cache.lengths; returns logits (rows, vocab) in fp32."""
        rows = tokens.shape[0]
        positions = cache.lengths
        cache.ensure_capacity(int(positions.max()) + 1)
        hidden = self.embed(tokens)[:, None]  # (rows, 1, hidden)
        cos, sin = self.rotary(hidden, positions[:, None])
        row_index = torch.arange(rows, device=tokens.device)
        span = int(positions.max()) + 1
        visible = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, hidden)
            q = attn.q_proj(x).view(rows, -1, attn.head_dim)
            k = attn.k_proj(x).view(rows, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            heads = q.shape[1]
            q, k = _rotate(torch.cat([q, k], dim=1), cos, sin).split([heads, k.shape[1]], dim=1)
            v = attn.v_proj(x).view(rows, -1, attn.head_dim)
            cache.keys[index][row_index, :, positions] = k
            cache.values[index][row_index, :, positions] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None],
                cache.keys[index][:, :, :span],
                cache.values[index][:, :, :span],
                attn_mask=visible,
                scale=attn.scaling,
                enable_gqa=True,
            )
            hidden = hidden + attn.o_proj(out.reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
        cache.lengths = positions + 1
        return self.lm_head(_rms_norm(self.norm, hidden))[:, 0].float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it (rotate_half convention); x is (rows, heads, dim),
    cos and sin (rows, 1, dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm in one fused call: weight * (x / rms(x)) computed in fp32, as transformers does."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return norm.weight * normed.to(x.dtype)
