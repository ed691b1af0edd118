"""Structured pruning of the language model, Minitron-style, for any HF model lorafleet loads.

No library prunes a Hugging Face VLM this way (ModelOpt's Minitron pruner is Megatron-only,
Torch-Pruning ranks by weight magnitude), so we do it here. Importance comes from activations on
calibration data:
  * MLP neurons: mean |input of down_proj| over each sequence, L2 over sequences;
  * attention: the same on the input of o_proj, per head, summed per key/value group, so whole
    GQA groups (one KV head and its query heads) go together and the model stays loadable;
  * depth: 1 - cos(input, output) of each decoder layer (ShortGPT's block influence).
Widths are the same in every layer (stock configs cannot express anything else), the hidden size
is never touched (the vision projector and the adapters' shapes depend on it), and the vision tower
and projector are left alone. The result is an ordinary HF directory with a rewritten config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafleet.data.batch import collate
from lorafleet.data.encode import Example
from lorafleet.errors import ConfigError
from lorafleet.models.loading import FrozenBase

MARLIN_MULTIPLE = 128  # vLLM's quantized kernels need widths divisible by this


@dataclass
class PruneRequest:
    mlp: float = 0.0  # fraction of MLP neurons to remove
    heads: float = 0.0  # fraction of key/value groups (with their query heads) to remove
    layers: int = 0  # decoder layers to remove

    def validate(self, config) -> None:
        for name in ("mlp", "heads"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--prune-{name} must be in [0, 1), got {value}")
        if self.heads and round(config.num_key_value_heads * (1 - self.heads)) < 1:
            raise ConfigError(
                f"--prune-heads {self.heads} would remove all {config.num_key_value_heads} key/value groups; "
                "keep at least one"
            )
        if not 0 <= self.layers < config.num_hidden_layers:
            raise ConfigError(
                f"--prune-layers must be between 0 and {config.num_hidden_layers - 1} "
                f"(the model has {config.num_hidden_layers} decoder layers), got {self.layers}"
            )


@dataclass
class Importance:
    neurons: list[torch.Tensor] = field(default_factory=list)  # per layer (intermediate,)
    groups: list[torch.Tensor] = field(default_factory=list)  # per layer (kv_heads,)
    depth: torch.Tensor | None = None  # (layers,) block influence, low = removable


@dataclass
class PrunePlan:
    keep_layers: list[int]
    keep_neurons: list[torch.Tensor]  # per kept layer, sorted indices
    keep_groups: list[torch.Tensor]  # per kept layer, sorted kv-head indices
    intermediate_size: int
    kv_heads: int
    heads: int
    removed: dict[str, str] = field(default_factory=dict)  # human-readable summary

    def describe(self) -> str:
        return "\n".join(f"  {key}: {value}" for key, value in self.removed.items())


@torch.no_grad()
def measure_importance(base: FrozenBase, examples: Sequence[Example], batch_size: int = 4) -> Importance:
    """Run calibration examples and collect activation-based importance for neurons, groups, layers."""
    lm = base.language_model
    config = lm.config
    layers = list(lm.layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    neuron_sq = [torch.zeros(config.intermediate_size) for _ in layers]
    head_sq = [torch.zeros(config.num_attention_heads * head_dim) for _ in layers]
    depth = torch.zeros(len(layers))
    mask_holder: dict[str, torch.Tensor] = {}

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        """Per sequence, mean |x| over its real tokens: (batch, channels)."""
        mask = mask_holder["mask"][..., None].to(x.dtype)
        return (x.abs() * mask).sum(1) / mask.sum(1).clamp(min=1)

    hooks = []
    for index, layer in enumerate(layers):

        def on_down(_, args, index=index):
            neuron_sq[index] += mean_abs(args[0]).pow(2).sum(0).float().cpu()

        def on_o(_, args, index=index):
            head_sq[index] += mean_abs(args[0]).pow(2).sum(0).float().cpu()

        def on_layer(_, args, output, index=index):
            hidden_in = args[0] if args else None
            hidden_out = output[0] if isinstance(output, tuple) else output
            if hidden_in is None:
                return
            mask = mask_holder["mask"].to(hidden_in.dtype)
            cosine = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            depth[index] += (((1 - cosine) * mask).sum() / mask.sum().clamp(min=1)).cpu()

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o))
        hooks.append(layer.register_forward_hook(on_layer))
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id).to(base.device)
            mask_holder["mask"] = batch.attention_mask
            base.model(**batch.model_inputs(), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    neurons = [scores.sqrt() for scores in neuron_sq]
    groups = [
        scores.sqrt().view(config.num_attention_heads, head_dim).norm(dim=1).view(-1, group).sum(1)
        for scores in head_sq
    ]
    return Importance(neurons, groups, depth)


def plan_pruning(config, importance: Importance, request: PruneRequest) -> PrunePlan:
    """Decide what goes: the least important layers, neurons and key/value groups."""
    request.validate(config)
    order = torch.argsort(importance.depth)  # lowest influence first
    dropped = sorted(order[: request.layers].tolist())
    keep_layers = [i for i in range(config.num_hidden_layers) if i not in dropped]
    intermediate = _new_width(config.intermediate_size, request.mlp)
    kv_heads = config.num_key_value_heads - int(math.floor(config.num_key_value_heads * request.heads + 1e-9))
    kv_heads = max(kv_heads, 1)
    group = config.num_attention_heads // config.num_key_value_heads
    keep_neurons = [_top(importance.neurons[i], intermediate) for i in keep_layers]
    keep_groups = [_top(importance.groups[i], kv_heads) for i in keep_layers]
    removed = {
        "decoder layers": f"{config.num_hidden_layers} -> {len(keep_layers)}"
        + (f" (dropping {dropped})" if dropped else ""),
        "MLP width": f"{config.intermediate_size} -> {intermediate}",
        "attention heads": f"{config.num_attention_heads} -> {kv_heads * group} "
        f"({config.num_key_value_heads} -> {kv_heads} key/value groups)",
    }
    return PrunePlan(keep_layers, keep_neurons, keep_groups, intermediate, kv_heads, kv_heads * group, removed)


@torch.no_grad()
def apply_plan(base: FrozenBase, plan: PrunePlan) -> None:
    """Slice the language model in place and rewrite its config to match."""
    lm = base.language_model
    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    kept = nn.ModuleList(lm.layers[i] for i in plan.keep_layers)
    for new_index, (layer, neurons, groups) in enumerate(zip(kept, plan.keep_neurons, plan.keep_groups, strict=True)):
        mlp, attn = layer.mlp, layer.self_attn
        mlp.gate_proj = _slice(mlp.gate_proj, rows=neurons)
        mlp.up_proj = _slice(mlp.up_proj, rows=neurons)
        mlp.down_proj = _slice(mlp.down_proj, columns=neurons)
        kv_channels = _channels(groups, head_dim)
        q_heads = (groups[:, None] * group + torch.arange(group)).flatten()
        q_channels = _channels(q_heads, head_dim)
        attn.q_proj = _slice(attn.q_proj, rows=q_channels)
        attn.k_proj = _slice(attn.k_proj, rows=kv_channels)
        attn.v_proj = _slice(attn.v_proj, rows=kv_channels)
        attn.o_proj = _slice(attn.o_proj, columns=q_channels)
        attn.layer_idx = new_index
        attn.num_key_value_groups = group
    lm.layers = kept
    config.head_dim = head_dim  # explicit, so the narrower attention still loads
    config.intermediate_size = plan.intermediate_size
    config.num_attention_heads = plan.heads
    config.num_key_value_heads = plan.kv_heads
    config.num_hidden_layers = len(plan.keep_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in plan.keep_layers]


def _new_width(width: int, fraction: float) -> int:
    kept = width - int(math.floor(width * fraction + 1e-9))
    if width >= 8 * MARLIN_MULTIPLE and fraction:  # large enough to keep kernel-friendly widths
        kept = max(MARLIN_MULTIPLE, kept // MARLIN_MULTIPLE * MARLIN_MULTIPLE)
    return max(kept, 1)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, count).indices).values


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    sliced = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    sliced.weight.copy_(weight)
    if bias is not None:
        sliced.bias.copy_(bias)
    sliced.requires_grad_(False)
    return sliced
