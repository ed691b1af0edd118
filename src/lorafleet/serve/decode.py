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

from lorafleet.adapters.layer import MultiLoRALinear
from lorafleet.adapters.reference import slot_feature_mask
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
    on [0, lengths[i]). Capacity grows by doubling; rows come and go with the batch. The lengths
    are kept on the host too (`host_lengths`), so that sizing a step never waits for the device."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor, host_lengths: list[int]
    ) -> None:
        self.keys, self.values, self.lengths, self.host_lengths = keys, values, lengths, host_lengths

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

    def select(self, rows: list[int]) -> None:
        """Keep only `rows`, in that order, and drop capacity nobody needs any more."""
        self.host_lengths = [self.host_lengths[row] for row in rows]
        rows = torch.tensor(rows, device=self.lengths.device)
        self.lengths = self.lengths[rows]
        used = max(self.host_lengths, default=0) + 1
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
        self.host_lengths = self.host_lengths + other.host_lengths


@torch.no_grad()
def prefill(base: BaseModel, prompts: list, device: torch.device) -> tuple[torch.Tensor, KVCache]:
    """Run the prompts (right-padded) through the model: last-token logits (rows, vocab) and the cache."""
    batch = collate(prompts, base.tokenizer.pad_token_id)
    host_lengths = batch.attention_mask.sum(dim=1).tolist()
    batch = batch.to(device)
    inputs = batch.model_inputs()
    lengths = batch.attention_mask.sum(dim=1)
    output = base.model.model(**inputs, past_key_values=DynamicCache(), use_cache=True)
    last = output.last_hidden_state[torch.arange(len(prompts), device=device), lengths - 1]
    logits = base.model.get_output_embeddings()(last).float()
    layers = output.past_key_values.layers
    cache = KVCache([layer.keys for layer in layers], [layer.values for layer in layers], lengths, host_lengths)
    return logits, cache


class FusedProjections:
    """Projections that read the same input (q/k/v; gate/up), with every adapter they carry, as
    one matmul for base and LoRA-down together plus one for LoRA-up:

        z = x @ [W_1; ...; W_m; A_1; ...; A_m].T      base outputs and every slot's rank features
        y = z[:, :out] + bias + (z[:, out:] * mask) @ blockdiag(B_1, ..., B_m)

    where A_j, B_j are module j's slot-stacked adapters (`lora_delta_stacked`'s layout, re-padded
    to the group's common slot count and rank) and mask keeps each row's own slot. On a small
    model a decode step is launch-bound: this turns 15 operations for q/k/v into 5. Modules are
    looked up on every call (loading an adapter at run time wraps them) and the fused weights are
    rebuilt whenever a module changes or an adapter is loaded or unloaded (the routing's slot
    version): as in the engine, adapter weights are not modified in place while serving. The LoRA
    products run in the base's dtype (as vLLM's do). Only plain Linear bases fuse; other groups
    (quantized bases) run module by module."""

    def __init__(self, parent: nn.Module, names: list[str]) -> None:
        self.parent, self.names = parent, names
        self._weights: tuple | None = None  # (key, tensors the key refers to, fused weights...)
        self._mask: tuple | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        modules = [getattr(self.parent, name) for name in self.names]
        routing = next((m.routing for m in modules if isinstance(m, MultiLoRALinear)), None)
        key = (tuple(map(id, modules)), routing.slots_version if routing is not None else -1)
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, modules, self._prepare(modules))  # `modules` keeps the ids valid
        prepared = self._weights[2]
        if prepared is None:
            return [module(x) for module in modules]
        weight, bias, b_blockdiag, slots, rank, splits = prepared
        if b_blockdiag is None:
            return list(F.linear(x, weight, bias).split(splits, dim=-1))
        z = F.linear(x, weight)
        out = sum(splits)
        base = z[..., :out] if bias is None else z[..., :out] + bias
        mask = self._feature_mask(routing, slots, rank, x.dtype, x.device, len(modules))
        y = base + (z[..., out:] * mask) @ b_blockdiag
        return list(y.split(splits, dim=-1))

    def _prepare(self, modules: list[nn.Module]) -> tuple | None:
        bases = [m.base_layer if isinstance(m, MultiLoRALinear) else m for m in modules]
        if not all(type(b) is nn.Linear for b in bases):
            return None
        stacks = [
            m.stacked_weights() if isinstance(m, MultiLoRALinear) and m.adapter_weights() else None for m in modules
        ]
        return self._build(stacks, bases)

    @staticmethod
    def _build(stacks: list, bases: list[nn.Linear]) -> tuple:
        splits = [b.out_features for b in bases]
        weights = [b.weight for b in bases]
        bias = None
        if any(b.bias is not None for b in bases):
            bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
        present = [stack for stack in stacks if stack is not None]
        if not present:
            return torch.cat(weights), bias, None, 0, 0, splits
        rank = max(r for _, _, r in present)
        slots = max(a.shape[0] // r for a, _, r in present)
        a_all = weights[0].new_zeros(len(bases) * slots * rank, weights[0].shape[1])
        b_blockdiag = weights[0].new_zeros(len(bases) * slots * rank, sum(splits))
        column = 0
        for index, stack in enumerate(stacks):
            if stack is not None:
                a_cat, b_cat, r = stack
                for slot in range(a_cat.shape[0] // r):
                    row = (index * slots + slot) * rank
                    a_all[row : row + r] = a_cat[slot * r : (slot + 1) * r]
                    b_blockdiag[row : row + r, column : column + splits[index]] = b_cat[slot * r : (slot + 1) * r]
            column += splits[index]
        return torch.cat([*weights, a_all]), bias, b_blockdiag, slots, rank, splits

    def _feature_mask(self, routing, slots: int, rank: int, dtype, device, groups: int) -> torch.Tensor:
        row_slots = routing.row_slots(device)  # first: it may bump row_slots_version
        key = (routing.row_slots_version, slots, rank, dtype)
        if self._mask is None or self._mask[0] != key:
            mask = slot_feature_mask(row_slots, slots, rank, dtype).repeat(1, groups)
            self._mask = (key, mask[:, None, :])
        return self._mask[1]


class Decoder:
    """One decode step for every row: the model's modules, our cache, no transformers forward."""

    def __init__(self, base: BaseModel) -> None:
        check_supported(base)
        lm = base.language_model
        self.embed, self.layers, self.norm, self.rotary = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = base.model.get_output_embeddings()
        self.qkv = [FusedProjections(layer.self_attn, ["q_proj", "k_proj", "v_proj"]) for layer in self.layers]
        self.gate_up = [FusedProjections(layer.mlp, ["gate_proj", "up_proj"]) for layer in self.layers]
        # single projections too: one matmul fewer than the generic adapter layer, and cached masks
        self.o = [FusedProjections(layer.self_attn, ["o_proj"]) for layer in self.layers]
        self.down = [FusedProjections(layer.mlp, ["down_proj"]) for layer in self.layers]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens (rows,) at positions cache.lengths; returns logits (rows, vocab) in fp32."""
        rows = tokens.shape[0]
        positions = cache.lengths
        span = max(cache.host_lengths) + 1  # the longest row after this token
        cache.ensure_capacity(span)
        hidden = self.embed(tokens)[:, None]  # (rows, 1, hidden)
        cos, sin = self.rotary(hidden, positions[:, None])
        row_index = torch.arange(rows, device=tokens.device)
        visible = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, hidden)
            q, k, v = self.qkv[index](x)
            q = q.reshape(rows, -1, attn.head_dim)
            k = k.reshape(rows, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            heads = q.shape[1]
            q, k = _rotate(torch.cat([q, k], dim=1), cos, sin).split([heads, k.shape[1]], dim=1)
            v = v.reshape(rows, -1, attn.head_dim)
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
            hidden = hidden + self.o[index](out.reshape(rows, 1, -1))[0]
            gate, up = self.gate_up[index](_rms_norm(layer.post_attention_layernorm, hidden))
            hidden = hidden + self.down[index](layer.mlp.act_fn(gate) * up)[0]
        cache.lengths = positions + 1
        cache.host_lengths = [length + 1 for length in cache.host_lengths]
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
