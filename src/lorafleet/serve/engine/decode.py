"""The decode step: static shapes, every adapter of the fleet, sampling included — one graph.

transformers' forward rebuilds masks, cache objects and output records on every call, and a
cache that grows by `cat` gives every step new shapes: on a GPU each new shape costs attention
plans and each operation a launch from Python, so a 1.5B model decoded 32 streams at ~1% of
what the GPU can do. Here, gpt-fast and vLLM style, the step is ours, over the model's own
modules (so RMSNorm, rotary embedding and weights are exactly the model's):

    embed → per layer [norm → q/k/v (+ every row's own adapter) → rope → write k/v at each row's
    position in its KV-cache slot → attention over its slot's first `span` positions → o_proj →
    norm → gate/up → down] → norm → head → next token per row (on the device) + finite check
    (+ a grammar's token mask, + log-probabilities, in the steps whose rows ask for them)

Every input is a tensor of fixed shape for a (rows, span) bucket — tokens, slots, positions,
adapter slots, sampling parameters — and every weight lives at a fixed address, adapters
included (`lora_stacks.ProjectionGroup`: each projection's adapters stacked by fleet slot, refreshed in place
when an adapter is loaded or reloaded). So on CUDA `GraphDecoder` captures the step once per
bucket and replays it: one graph launch and one host read (the ids) per step. On CPU the same
function runs eagerly; tests/serve/test_decode.py holds both to the model's own forward and the
graph to the eager step.

Prefill stays with transformers (it handles images, once per arrival, not per token): `prefill`
runs the inner model on right-padded prompts; the engine copies the keys/values into the rows'
slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.data.batch import collate
from lorafleet.errors import ModelLoadError
from lorafleet.models.hf_compat import prefill_with_cache
from lorafleet.models.loading import FrozenBase
from lorafleet.serve.engine.device_sampling import (
    allowed_tokens,
    finite_rows,
    sample_rows,
    sampling_mode,
    token_logprobs,
)
from lorafleet.serve.engine.kv_cache import SlotKVCache
from lorafleet.serve.engine.lora_stacks import ProjectionGroup, RowOwners, capacity_for

SUPPORTED_LAYERS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))  # fmt: skip


def check_supported(base: FrozenBase) -> None:
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


def choose_tokens(
    logits: torch.Tensor, inputs: dict[str, torch.Tensor], positions: torch.Tensor, kind: StepKind
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every row's next token from its fp32 logits (rows, vocab), at `positions` (where the token
    will be fed; a draw depends on it): (2, rows) int64 of tokens and finite flags, and the
    log-probabilities when `kind` asks."""
    allowed = allowed_tokens(inputs["bitmask"], logits.shape[-1]) if kind.masked else None
    ids = sample_rows(
        logits, inputs["temperature"], inputs["top_p"], inputs["seeds"], positions, kind.sampling, allowed
    )
    chosen = torch.stack([ids, finite_rows(logits).long()])
    return chosen, token_logprobs(logits, ids) if kind.logprobs else None


@torch.no_grad()
def prefill(base: FrozenBase, prompts: list, device: torch.device):
    """Run the prompts (right-padded) through the model: last-token logits (rows, vocab) in fp32,
    and per layer the keys and values (rows, kv_heads, padded length, head_dim)."""
    batch = collate(prompts, base.tokenizer.pad_token_id).to(device)
    lengths = batch.attention_mask.sum(dim=1)
    hidden, keys, values = prefill_with_cache(base.model, batch.model_inputs())
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    logits = base.model.get_output_embeddings()(last).float()
    return logits, keys, values


class StepKind(NamedTuple):
    """What a step computes beyond the forward: one compiled variant (one CUDA graph per bucket) each."""

    sampling: str  # device_sampling.MODES
    masked: bool = False  # some row is under a grammar: the inputs carry its token bitmask
    logprobs: bool = False  # some row asked for log-probabilities


class StaticDecoder:
    """One decode step for a bucket of rows, every shape fixed by (rows, span)."""

    def __init__(self, base: FrozenBase, cache: SlotKVCache, fuse_weights: bool = True) -> None:
        check_supported(base)
        lm = base.language_model
        self.base, self.cache = base, cache
        self.embed, self.layers, self.norm, self.rotary = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = base.model.get_output_embeddings()
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        self.stacks = [
            [ProjectionGroup(getattr(layer, part), names, dtype, device, fuse_weights) for part, names in GROUPS]
            for layer in self.layers
        ]
        self._slots_version: int | None = None
        self._version = 0

    def refresh_adapters(self, slots: dict[str, int], slots_version: int | None = None) -> int:
        """Bring every stack up to date with the fleet when its adapters changed (`slots_version`,
        the routing's: bumped by every load and unload; adapter weights are not edited in place
        while serving); returns a version that changes whenever buffers were reallocated
        (captured graphs then refer to stale memory)."""
        if slots_version is None or slots_version != self._slots_version:
            capacity = capacity_for(max(slots.values(), default=0))
            for layer in self.stacks:
                for stack in layer:
                    stack.refresh(slots, capacity)
            self._slots_version = slots_version
            self._version = sum(stack.version for layer in self.stacks for stack in layer)
        return self._version

    @torch.no_grad()
    def step(
        self, inputs: dict[str, torch.Tensor], span: int, kind: StepKind
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs: tokens, slots, positions, adapters, seeds (rows,) int64; temperature, top_p
        (rows,) float32; with `kind.masked` also bitmask (rows, words) int32. Returns (2, rows)
        int64: next token, and 1 where the row's logits were all finite; and with `kind.logprobs`
        `device_sampling.token_logprobs` of each row (else None)."""
        return choose_tokens(self.logits(inputs, span), inputs, inputs["positions"], kind)

    @torch.no_grad()
    def logits(self, inputs: dict[str, torch.Tensor], span: int) -> torch.Tensor:
        """The step's forward: each row's next-token logits (rows, vocab) in fp32."""
        tokens, slots, positions = inputs["tokens"], inputs["slots"], inputs["positions"]
        rows = tokens.shape[0]
        hidden = self.embed(tokens)[:, None]  # (rows, 1, hidden)
        cos, sin = self.rotary(hidden, positions[:, None])
        visible = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        owners = RowOwners(inputs["adapters"])
        for index, layer in enumerate(self.layers):
            attn, (qkv, o, gate_up, down) = layer.self_attn, self.stacks[index]
            q, k, v = qkv(_rms_norm(layer.input_layernorm, hidden), owners)
            q = q.reshape(rows, -1, attn.head_dim)
            k = k.reshape(rows, -1, attn.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            heads = q.shape[1]
            q, k = _rotate(torch.cat([q, k], dim=1), cos, sin).split([heads, k.shape[1]], dim=1)
            keys, values = self.cache.keys[index], self.cache.values[index]
            keys[slots, :, positions] = k
            values[slots, :, positions] = v.reshape(rows, -1, attn.head_dim)
            out = F.scaled_dot_product_attention(
                q[:, :, None],
                keys[:, :, :span].index_select(0, slots),  # each row's own slot
                values[:, :, :span].index_select(0, slots),
                attn_mask=visible,
                scale=attn.scaling,
                enable_gqa=True,
            )
            (attended,) = o(out.reshape(rows, 1, -1), owners)
            hidden = hidden + attended
            gate, up = gate_up(_rms_norm(layer.post_attention_layernorm, hidden), owners)
            (mlp,) = down(layer.mlp.act_fn(gate) * up, owners)
            hidden = hidden + mlp
        return self.lm_head(_rms_norm(self.norm, hidden))[:, 0].float()


class GraphDecoder:
    """Runs `StaticDecoder.step` for any set of rows: padded up to a bucket of rows, the span a
    power of two; on CUDA each (rows, span, sampling mode) bucket is captured once as a CUDA graph
    and replayed with its inputs copied into place, elsewhere the step runs eagerly. Adapter
    slots, positions and lengths are graph inputs: loading an adapter or a changing batch never
    captures again within a bucket (only a reallocation of the adapter stacks does)."""

    ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __init__(
        self, base: FrozenBase, cache: SlotKVCache, graphs: bool | None = None, fuse_weights: bool = True
    ) -> None:
        self.decoder = StaticDecoder(base, cache, fuse_weights)
        self.cache, self.device = cache, base.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self._captured: dict[tuple, tuple] = {}  # bucket -> (graph, packed inputs, output)
        self._pool = None
        self._version = -1

    def bucket_rows(self, rows: int) -> int:
        return next((b for b in self.ROW_BUCKETS if b >= rows), rows)

    def step(
        self,
        host: dict[str, list],
        adapter_slots: dict[str, int],
        slots_version: int | None = None,
        bitmask: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        logprobs: bool = False,
    ) -> tuple[list[int], list[bool], list[list[float]] | None]:
        """host: per row tokens, slots, positions, adapters (fleet slot, 0 for the base), seeds,
        temperature, top_p; `bitmask` (rows, words) int32, the tokens each row may take (a row
        without a grammar: all bits set), or a function that returns it: called once the forward
        is under way when the step runs eagerly (the masks compute meanwhile), before a captured
        graph's replay otherwise. Returns each row's next token, whether its logits were finite,
        and (with `logprobs`) each row's `device_sampling.token_logprobs`."""
        version = self.decoder.refresh_adapters(adapter_slots, slots_version)
        if version != self._version:  # adapter buffers moved: every captured graph is stale
            self._captured.clear()
            self._version = version
        rows = len(host["tokens"])
        bucket = self.bucket_rows(rows)
        span = self.cache.span(host["slots"])
        kind = StepKind(sampling_mode(host["temperature"], host["top_p"]), bitmask is not None, logprobs)
        if not self.graphs:
            inputs = _unpack(*(t.to(self.device) for t in _pack(host, bucket, self.cache.scratch)))
            logits = self.decoder.logits(inputs, span)
            if kind.masked:
                inputs["bitmask"] = _pad_bitmask(_resolve(bitmask), bucket).to(self.device)
            chosen, scores = choose_tokens(logits, inputs, inputs["positions"], kind)
        else:
            packed = _pack(host, bucket, self.cache.scratch, _resolve(bitmask) if kind.masked else None)
            chosen, scores = self._replay((bucket, span, kind), packed)
        ids, finite = chosen.tolist()  # the step's one host transfer (two with logprobs)
        scores = scores[:rows].tolist() if scores is not None else None
        return ids[:rows], [bool(f) for f in finite[:rows]], scores

    def _replay(self, key: tuple, packed: tuple[torch.Tensor, ...]) -> tuple:
        if key not in self._captured:
            self._captured[key] = self._capture(key, tuple(t.to(self.device) for t in packed))
        graph, static, output = self._captured[key]
        for target, value in zip(static, packed, strict=True):
            target.copy_(value, non_blocking=True)
        graph.replay()
        return output

    def _capture(self, key: tuple, static: tuple[torch.Tensor, ...]) -> tuple:
        _, span, kind = key
        inputs = _unpack(*static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up kernels and workspaces off the capture
            for _ in range(2):
                self.decoder.step(inputs, span, kind)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.decoder.step(inputs, span, kind)
        return graph, static, output


INTEGER_INPUTS = ("tokens", "slots", "positions", "adapters", "seeds")
FLOAT_INPUTS = ("temperature", "top_p")
# A bucket's padding rows: the scratch slot at position 0, no adapter, greedy.
FILLER = {"tokens": 0, "positions": 0, "adapters": 0, "seeds": 0, "temperature": 0.0, "top_p": 1.0}


def _pack(
    host: dict[str, list], bucket: int, scratch: int, bitmask: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """The step's inputs as two host tensors (one copy each to the device), padded to the bucket,
    and the bitmask as a third (padding rows allow every token)."""
    extra = bucket - len(host["tokens"])
    pad = lambda name: list(host[name]) + [scratch if name == "slots" else FILLER[name]] * extra  # noqa: E731
    integers = torch.tensor([pad(name) for name in INTEGER_INPUTS], dtype=torch.long)
    floats = torch.tensor([pad(name) for name in FLOAT_INPUTS], dtype=torch.float32)
    if bitmask is None:
        return integers, floats
    return integers, floats, _pad_bitmask(bitmask, bucket)


def _pad_bitmask(bitmask: torch.Tensor, bucket: int) -> torch.Tensor:
    """Padding rows allow every token."""
    return torch.cat([bitmask, bitmask.new_full((bucket - bitmask.shape[0], bitmask.shape[1]), -1)])


def _resolve(bitmask: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    return bitmask() if callable(bitmask) else bitmask


def _unpack(integers: torch.Tensor, floats: torch.Tensor, bitmask: torch.Tensor | None = None) -> dict:
    inputs = {name: integers[i] for i, name in enumerate(INTEGER_INPUTS)}
    inputs |= {name: floats[i] for i, name in enumerate(FLOAT_INPUTS)}
    return inputs | ({"bitmask": bitmask} if bitmask is not None else {})


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
