"""GPTQ (Frantar et al., 2022): quantize a Linear's weight one input column at a time, moving each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs on calibration data (H = 2·XᵀX). Same scales and storage as round-to-nearest, lower
output error; what llm-compressor's W4A16 recipe runs, here in plain PyTorch.

Hessians are collected in one pass of the unquantized model over the calibration examples (every
layer sees full-precision inputs, not the outputs of already-quantized layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorafleet.data.batch import collate
from lorafleet.data.encode import Example
from lorafleet.models.loading import BaseModel

DAMPING = 0.01  # of the mean diagonal, added to H so that its Cholesky factor exists
BLOCK = 128  # columns updated together (lazy batch updates)


@torch.no_grad()
def input_hessians(base: BaseModel, names: Sequence[str], examples: Sequence[Example], batch_size: int = 4) -> dict:
    """H = 2/n · Σ xxᵀ over the real (non-padding) tokens reaching each named Linear of the language model."""
    lm = base.language_model
    hessians = {
        name: torch.zeros(lm.get_submodule(name).in_features, lm.get_submodule(name).in_features) for name in names
    }
    counts = dict.fromkeys(names, 0)
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name):
        def on_input(_, args):
            x = args[0][mask_holder["mask"]].float().cpu()  # (tokens, in_features)
            hessians[name] += 2 * x.T @ x
            counts[name] += x.shape[0]

        return on_input

    hooks = [lm.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id).to(base.device)
            mask_holder["mask"] = batch.attention_mask.bool()
            base.model(**batch.model_inputs(), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: hessians[name] / max(counts[name], 1) for name in names}


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, group: int, qmax: float, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values (out, in) in [-qmax, qmax] and scales (out, in // group) for `weight`.

    Symmetric absmax scales per group, computed when the algorithm reaches the group's first column
    (from the weights as already updated by the errors of earlier columns)."""
    weight = weight.detach().float().clone()
    rows, columns = weight.shape
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0  # inputs that never fire: their weights cannot matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += DAMPING * torch.diag(hessian).mean() * torch.eye(columns)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    values = torch.zeros(rows, columns)
    scales = torch.zeros(rows, columns // group)
    block = max(BLOCK // group, 1) * group  # blocks hold whole groups
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk = weight[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        inverse_chunk = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                absmax = chunk[:, i : i + group].abs().amax(dim=1)
                scales[:, column // group] = (absmax / qmax).clamp(min=1e-8).to(scale_dtype).float()
            scale = scales[:, column // group]
            q = torch.round(chunk[:, i] / scale).clamp(-qmax, qmax)
            values[:, column] = q
            error = (chunk[:, i] - q * scale) / inverse_chunk[i, i]
            chunk[:, i:] -= error[:, None] * inverse_chunk[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return values, scales


def gptq_linear(linear: nn.Linear, hessian: torch.Tensor, scheme, group: int | None, scale_dtype: torch.dtype):
    """A QuantizedLinear holding GPTQ's values for `linear` (int schemes only)."""
    from lorafleet.compress.quantize import QuantizedLinear

    quantized = QuantizedLinear(
        linear.in_features, linear.out_features, linear.bias is not None, scheme, group, linear.weight.device
    )
    values, scales = gptq_quantize(linear.weight, hessian, quantized.group, scheme.qmax, scale_dtype)
    quantized.set_values(values.to(torch.int8), scales)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return quantized
