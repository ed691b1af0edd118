"""Peak memory of a fleet step, predicted from the model's shape, the adapters and the tokens.

The trainer admits another adapter only while the prediction stays within the memory budget, and
`lorafleet plan` answers "does this fleet fit, and how many adapters like these would?" before
anything is loaded. The model is analytic; its terms, per fleet step:

- weights: every parameter and buffer of the base (vision tower included) as held in memory
  (int8/int4/NF4 weights at their stored size);
- adapter state: fp32 LoRA weights (DoRA's magnitude vectors included), their gradients and
  AdamW's two moments (16 bytes/parameter),
  plus the compute-dtype copy of every adapter's weights that the batched LoRA path
  (adapters/batched.py) keeps for backward;
- activations kept for backward, per token and decoder layer, for a Qwen2/Llama-style layer with
  LoRA on its projections and flash attention (linear in tokens), counted from what autograd
  really saves (tests/train/test_memory.py lists them with saved-tensor hooks, in fp32 and bf16):
  in the compute dtype the attention input, q, k, v and the attention output (which is also
  o_proj's input), the MLP input, gate, up, SiLU(gate) and their product, and the rank-r
  features of each of the seven projections (K·r where the step's rows are not equal blocks
  per adapter: packing, unequal micro-batches); in fp32 the two RMSNorm inputs (transformers
  normalises in fp32), their reciprocal RMS and attention's log-sum-exp per head:
  dtype·(2·hidden + 2·q_width + 2·kv_width + 4·intermediate + 7·r) + 4·(2·hidden + heads + 2)
  bytes. A step with DoRA adapters also keeps, for every token and every projection a DoRA
  adapter targets, one output-wide tensor in the compute dtype (adapters/dora.py: what the
  magnitude's gradient needs; the rescale runs over all the step's rows). With activation
  checkpointing only each layer's input is kept, plus one layer's activations while it is
  recomputed;
- the loss: the final norm's fp32 input and the hidden states, and chunks of logits (chunked
  loss) or the full tokens × vocabulary logits in the compute dtype, their fp32 copy and its
  gradient;
- a margin for the allocator and kernels' workspaces: 10% plus 512 MiB.

tests/train/test_memory.py holds the activation term to what autograd really keeps (measured with
saved-tensor hooks) on CPU. On CUDA the CUDA context (~0.5 GiB) is outside PyTorch's allocator and
outside this prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.train.loss import CHUNK_ELEMENTS

GIB = 2**30
ADAPTER_STATE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelShape:
    parameters: int  # all of them, vision tower included
    weight_bytes: int  # as held in memory: quantized weights count at their stored size
    hidden: int
    intermediate: int
    layers: int
    q_width: int  # attention heads × head_dim
    kv_width: int  # key/value heads × head_dim
    vocab: int
    heads: int = 0  # attention heads

    @classmethod
    def from_config(cls, config, parameters: int, weight_bytes: int) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            parameters=parameters,
            weight_bytes=weight_bytes,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            q_width=text.num_attention_heads * head_dim,
            kv_width=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
            heads=text.num_attention_heads,
        )


@dataclass(frozen=True)
class AdapterLoad:
    """What one adapter adds to a fleet step."""

    name: str
    rank: int
    lora_parameters: int
    rows: int  # sequences per step (micro-batch size)
    longest: int  # tokens of its longest sequence
    dora_outputs: int = 0  # DoRA: output features of the projections it targets, over all layers


@dataclass
class MemoryEstimate:
    weights: int
    adapter_state: int
    activations: int
    loss: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter_state + self.activations + self.loss + self.margin

    def describe(self) -> str:
        parts = ("weights", "adapter_state", "activations", "loss", "margin")
        detail = ", ".join(f"{part.replace('_', ' ')} {getattr(self, part) / GIB:.2f}" for part in parts)
        return f"{self.total / GIB:.2f} GiB ({detail})"


def activation_bytes_per_token(shape: ModelShape, features: int, dtype_bytes: int, dora_outputs: int = 0) -> int:
    """Bytes autograd keeps per token and decoder layer, with `features` LoRA features per
    projection and token and `dora_outputs` output features rescaled by DoRA adapters in the
    layer (see the module docstring)."""
    compute = 2 * shape.hidden + 2 * shape.q_width + 2 * shape.kv_width + 4 * shape.intermediate + 7 * features
    return dtype_bytes * (compute + dora_outputs) + 4 * (2 * shape.hidden + shape.heads + 2)


def dora_outputs_per_layer(shape: ModelShape, loads: Sequence[AdapterLoad]) -> int:
    """Output features per layer that the step's DoRA adapters rescale: their targets' widths
    summed (an overcount where two target the same projection), at most every projection's."""
    every_projection = shape.q_width + 2 * shape.kv_width + 2 * shape.hidden + 2 * shape.intermediate
    return min(sum(load.dora_outputs for load in loads) // max(shape.layers, 1), every_projection)


def lora_features(loads: Sequence[AdapterLoad], packing: bool) -> int:
    """LoRA features per token and projection: the largest rank when every adapter's rows form an
    equal block (one batched matmul over adapters), else every adapter's (the row-weighted path)."""
    if not loads:
        return 0
    rank = max(load.rank for load in loads)
    equal_blocks = not packing and len({load.rows for load in loads}) == 1
    return rank if equal_blocks else rank * len(loads)


def step_tokens(loads: Sequence[AdapterLoad], packing: bool) -> int:
    """Tokens one fleet step computes: padded to the longest sequence of the step, or packed."""
    if packing:
        return sum(load.rows * load.longest for load in loads)
    return sum(load.rows for load in loads) * max((load.longest for load in loads), default=0)


def estimate(
    shape: ModelShape,
    loads: Sequence[AdapterLoad],
    dtype_bytes: int,
    packing: bool = False,
    chunked_loss: bool = True,
    activation_checkpointing: bool = False,
) -> MemoryEstimate:
    tokens = step_tokens(loads, packing)
    per_layer = activation_bytes_per_token(
        shape, lora_features(loads, packing), dtype_bytes, dora_outputs_per_layer(shape, loads)
    )
    if activation_checkpointing:
        activations = tokens * (shape.layers * shape.hidden * dtype_bytes + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    final_norm = tokens * shape.hidden * (4 + dtype_bytes)
    if chunked_loss:
        loss = 3 * 4 * min(CHUNK_ELEMENTS, tokens * shape.vocab) + final_norm
    else:
        loss = tokens * shape.vocab * (dtype_bytes + 4 + 4) + final_norm
    lora = sum(load.lora_parameters for load in loads)
    state = lora * (ADAPTER_STATE_BYTES + dtype_bytes)
    weights = shape.weight_bytes
    subtotal = weights + state + activations + loss
    return MemoryEstimate(weights, state, activations, loss, margin=subtotal // 10 + 512 * 2**20)


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The shape of a built model (real or on the meta device); quantized weights count as weights."""
    from lorafleet.models.quantized import QuantizedLinear

    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    parameters = sum(p.numel() for p in model.parameters()) + quantized
    tensors = [*model.parameters(), *model.buffers()]
    return ModelShape.from_config(model.config, parameters, sum(t.numel() * t.element_size() for t in tensors))


def lora_parameters(model: torch.nn.Module, targets: Sequence[str], rank: int, dora: bool = False) -> int:
    """Parameters of a rank-`rank` LoRA adapter on the named Linear modules of `model` (with
    `dora`, its magnitude vectors too)."""
    return sum(rank * (b.in_features + b.out_features) for b in _bases(model, targets)) + (
        output_features(model, targets) if dora else 0
    )


def output_features(model: torch.nn.Module, targets: Sequence[str]) -> int:
    """The named Linear modules' output features, summed: a DoRA adapter's magnitudes, and the
    widths its rescale keeps for backward per token."""
    return sum(base.out_features for base in _bases(model, targets))


def _bases(model: torch.nn.Module, targets: Sequence[str]) -> list[torch.nn.Module]:
    return [getattr(model.get_submodule(name), "base_layer", model.get_submodule(name)) for name in targets]


def default_budget(device: torch.device) -> int | None:
    """90% of the GPU's memory; None (no limit) on CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
