"""GPTQ (Frantar et al., 2022): quantize a Linear's weight one input column at a time, moving each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs on calibration data (H = 2·XᵀX). Same scales and storage as round-to-nearest, lower
output error; what llm-compressor's W4A16 recipe runs, here in plain PyTorch.

Layers are done in order, each on the inputs the already-quantized layers before it produce
(`gptq_language_model`), as GPTQ and llm-compressor's sequential pipeline do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafleet.data.batch import collate
from lorafleet.data.encode import Example
from lorafleet.errors import ConfigError
from lorafleet.models.loading import FrozenBase

DAMPING = 0.01  # of the mean diagonal, added to H so that its Cholesky factor exists
BLOCK = 128  # columns updated together (lazy batch updates)


class _Caught(Exception):
    """Raised by the hook that catches the first decoder layer's inputs: nothing more is needed."""


@torch.no_grad()
def gptq_language_model(
    base: FrozenBase,
    scheme,
    examples: Sequence[Example],
    scale_dtype: torch.dtype,
    batch_size: int = 4,
    progress: bool = True,
) -> list[str]:
    """Quantize every Linear of the language model with GPTQ, one decoder layer at a time.

    The calibration batches' inputs to the first decoder layer are caught once (with the keyword
    arguments the model passes: masks, positions, rotary tables); then for each layer in turn the
    Hessians of its Linears are gathered on its inputs, the Linears are quantized, and the layer,
    now quantized, computes the next layer's inputs. Only one layer's Hessians exist at a time, on
    the model's device, and every layer is fitted to the inputs it will really see."""
    from lorafleet.compress.quantize import linear_names, model_group_size

    lm = base.language_model
    group = model_group_size(lm, scheme)
    names = linear_names(lm)
    leftover = [name for name in names if not name.startswith("layers.")]
    if leftover:
        raise ConfigError(f"GPTQ covers decoder layers only; {leftover[:3]} sit outside them (use --rtn)")
    inputs, masks = _first_layer_inputs(base, examples, batch_size)
    for index, layer in enumerate(tqdm(lm.layers, desc="GPTQ", unit="layer", disable=not progress)):
        prefix = f"layers.{index}."
        local = [name.removeprefix(prefix) for name in names if name.startswith(prefix)]
        hessians = _layer_hessians(layer, local, inputs, masks)
        for name in local:
            layer.set_submodule(
                name, gptq_linear(layer.get_submodule(name), hessians.pop(name), scheme, group, scale_dtype)
            )
        inputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    return names


def _first_layer_inputs(base: FrozenBase, examples: Sequence[Example], batch_size: int):
    caught, masks = [], []

    def catch(_, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, kwargs))
        raise _Caught

    handle = base.language_model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], base.tokenizer.pad_token_id).to(base.device)
            masks.append(batch.attention_mask.bool())
            try:
                base.model(**batch.model_inputs(), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught, masks


def _layer_hessians(layer: nn.Module, names: list[str], inputs: list, masks: list) -> dict[str, torch.Tensor]:
    """H = 2/n · Σ xxᵀ over the real (non-padding) tokens reaching each named Linear of `layer`."""
    hessians, counts, current = {}, dict.fromkeys(names, 0), {}
    for name in names:
        width = layer.get_submodule(name).in_features
        hessians[name] = torch.zeros(width, width, device=inputs[0][0].device)

    def hook(name):
        def on_input(_, args):
            x = args[0][current["mask"]].float()  # (tokens, in_features)
            hessians[name] += 2 * x.T @ x
            counts[name] += x.shape[0]

        return on_input

    handles = [layer.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for (hidden, kwargs), mask in zip(inputs, masks, strict=True):
            current["mask"] = mask
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: hessians[name] / max(counts[name], 1) for name in names}


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, damping the diagonal more each time H is not positive
    definite enough (near-duplicate inputs, few calibration tokens)."""
    identity = torch.eye(hessian.shape[0], device=hessian.device)
    mean_diagonal = torch.diag(hessian).mean()
    for damping in (DAMPING, 0.1, 1.0, 10.0):
        try:
            lower = torch.linalg.cholesky(hessian + damping * mean_diagonal * identity)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ConfigError("GPTQ: a layer's input statistics are degenerate even with heavy damping; use --rtn")


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, group: int, qmax: float, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values (out, in) in [-qmax, qmax] and scales (out, in // group) for `weight`.

    Symmetric absmax scales per group, computed when the algorithm reaches the group's first column
    (from the weights as already updated by the errors of earlier columns)."""
    weight = weight.detach().float().clone()
    rows, columns = weight.shape
    hessian = hessian.to(weight.device).clone()
    dead = torch.diag(hessian) == 0  # inputs that never fire: their weights cannot matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    inverse = _inverse_cholesky(hessian)
    values = torch.zeros(rows, columns, device=weight.device)
    scales = torch.zeros(rows, columns // group, device=weight.device)
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
    from lorafleet.models.quantized import QuantizedLinear

    quantized = QuantizedLinear(
        linear.in_features, linear.out_features, linear.bias is not None, scheme, group, linear.weight.device
    )
    values, scales = gptq_quantize(linear.weight, hessian, quantized.group, scheme.qmax, scale_dtype)
    quantized.set_values(values.to(torch.int8), scales)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return quantized
