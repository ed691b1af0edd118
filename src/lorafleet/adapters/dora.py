"""DoRA (weight-decomposed LoRA, ICML'24) as one per-row scale on top of the LoRA maths.

A DoRA adapter adds a trained magnitude vector m (one number per output feature) to LoRA. Its
layer computes, as peft's `DoraLinearLayer` does (bias b, scaling s, no dropout):

    g = m / ||W + s·B·A||_row           (out,)   the norm detached, as the paper (§4.3) and peft do
    y = W·x + b + (g - 1)·(W·x) + g·(s·B·A·x)

so a DoRA adapter is a LoRA adapter whose rows are rescaled by g afterwards. In a fleet each row
of the batch takes its own adapter's g (1 for plain LoRA and the base, which then stay exactly as
they were), and the LoRA delta of every adapter still comes from one set of kernels per
projection (batched.py, fused.py, the engine's stacks).

The norm is computed without materialising W + s·B·A (out × in per adapter per layer):

    ||W_i + s(BA)_i||² = ||W_i||² + 2s·Σ_r B_ir (W·Aᵀ)_ir + s²·Σ_rq B_ir (A·Aᵀ)_rq B_iq

||W_i||² once per layer (the base is frozen), W·Aᵀ one matmul for every DoRA adapter of the
projection at once (the same FLOPs as B·A, an (out × K·r) result instead of K (out × in) ones),
A·Aᵀ a batched (r × r). `weight_norm_reference` is the plain twin, peft's formula;
tests/adapters/test_dora.py holds the two together in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.adapters.reference import LoRAWeights
from lorafleet.errors import AdapterError


class Magnitude(nn.Module):
    """DoRA's trained magnitude vector of one adapter on one layer; `weight` as peft names it
    (`lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, norms: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norms.clone())


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The frozen (out, in) weight DoRA normalises against."""
    if type(base_layer) is not nn.Linear:
        raise AdapterError(
            f"DoRA needs the base's dense weight, and this projection is a {type(base_layer).__name__}; "
            "train or serve DoRA adapters on an unquantized base (variant: lora works on any)"
        )
    return base_layer.weight


def weight_norm_reference(weight: torch.Tensor, adapter: LoRAWeights) -> torch.Tensor:
    """(out,) ||W + s·B·A|| per output row, as peft computes it (the sum materialised), detached."""
    with torch.no_grad():
        dtype = adapter.lora_A.weight.dtype
        lora = adapter.lora_B.weight @ adapter.lora_A.weight
        return torch.linalg.norm(weight.to(dtype) + adapter.scaling * lora, dim=1)


def weight_norms(weight: torch.Tensor, row_norms_sq: torch.Tensor, adapters: list[LoRAWeights]) -> torch.Tensor:
    """(K, out): `weight_norm_reference` of every adapter at once, without forming W + s·B·A.

    `row_norms_sq` is ||W_i||² (out,) in the adapters' dtype; ranks may differ (zero-padded to the
    largest, where the padding adds nothing). Detached: no gradient flows through a norm."""
    with torch.no_grad():
        rank = max(w.lora_A.out_features for w in adapters)
        a = torch.stack([_pad(w.lora_A.weight, rank, 0) for w in adapters])  # (K, r, in)
        b = torch.stack([_pad(w.lora_B.weight, rank, 1) for w in adapters])  # (K, out, r)
        scalings = a.new_tensor([w.scaling for w in adapters])[:, None]  # (K, 1)
        # W·Aᵀ in the base's dtype (the compute dtype), the sums in the adapters' dtype
        projected = F.linear(a.flatten(0, 1).to(weight.dtype), weight).to(a.dtype)  # (K·r, out)
        projected = projected.view(len(adapters), rank, -1).mT.contiguous()  # (K, out, r), summed along r
        cross = (b * projected).sum(-1)
        quadratic = (torch.bmm(b, torch.bmm(a, a.mT)) * b).sum(-1)
        squared = row_norms_sq + 2 * scalings * cross + scalings.square() * quadratic
        return squared.clamp(min=0).sqrt()


def row_norms_squared(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||W_i||² (out,) in `dtype`: the frozen base's part of every DoRA norm."""
    return weight.to(dtype).square().sum(dim=1)


def scale_table(magnitudes: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
    """(K + 1, out): row k holds m_k / norm_k (with m_k's gradient), the last row 1 (every row
    of the batch that is not DoRA's)."""
    scales = torch.stack(magnitudes) / norms
    return torch.cat([scales, scales.new_ones(1, scales.shape[1])])


def rescale_rows(result: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor, scale: torch.Tensor):
    """y = result + (g - 1)·(result - b) + g·delta for (rows, tokens, out) result and delta and
    (rows, 1, out) scale g: each row its own adapter's g, broadcast over its tokens.

    Rows whose g is 1 get result + delta exactly (their (g - 1) term is an exact 0). Backward
    keeps one (rows, tokens, out) tensor, result - b + delta (what g's gradient needs), where
    autograd would keep two."""
    scale = scale.to(result.dtype)
    return _RowRescale.apply(result, None if bias is None else bias.to(result.dtype), delta.to(result.dtype), scale)


class _RowRescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, bias, delta, scale):
        linear = result if bias is None else result - bias
        ctx.save_for_backward(scale, linear + delta)
        return result + (scale - 1) * linear + scale * delta

    @staticmethod
    def backward(ctx, grad):
        scale, combined = ctx.saved_tensors
        through = grad * scale  # dy/d(result) = dy/d(delta) = g
        return through, None, through, (grad * combined).sum(dim=1, keepdim=True)


def _pad(weight: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - weight.shape[dim]
    if not missing:
        return weight
    return F.pad(weight, (0, 0, 0, missing) if dim == 0 else (0, missing))
