"""Fused multi-adapter LoRA for training, in Triton: every adapter's update in one launch per matmul.

`lora_delta_reference` loops over segments in Python and launches two small matmuls per adapter
per layer (four more in backward), each too small to fill a GPU. Here the batch's token rows are
cut into segments (SGMV, as in Punica/S-LoRA) and one kernel launch computes every segment's
matmul against its own adapter's weights, forward and backward:

    shrink   h[s:e]  = x[s:e] @ A_k.T                  (tokens × r_k)
    expand   y[s:e]  = h[s:e] @ (c_k B_k).T            (tokens × out)
    backward dh      = dy[s:e] @ (c_k B_k)             dx[s:e] = dh @ A_k
             dB_k    = c_k · dy[s:e].T @ h[s:e]        dA_k    = dh.T @ x[s:e]

Ranks may differ between adapters (8, 16, 64 in one batch): weights are stacked padded to the
largest rank and every kernel masks by the segment's own rank. Accumulation is fp32; fp32 inputs
use IEEE (not TF32) products so results match the plain-PyTorch layer; bf16 inputs use bf16 tensor
cores (fp32 accumulation). Dropout is not fused: adapters with dropout take the reference path.

The kernels run on CUDA, and on CPU under `TRITON_INTERPRET=1` (how the tests check them).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from lorafleet.adapters.reference import LoRAWeights, lora_delta_reference
from lorafleet.segments import Segment

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32
# Triton's CPU interpreter multiplies bf16 tiles wrongly in tl.dot; there the tiles are widened to
# fp32 first (exact products, fp32 sums: what bf16 tensor cores compute too).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def is_enabled(device: torch.device) -> bool:
    """Opt-in with LORAFLEET_FUSED_LORA=1: on CUDA (after a one-time self-check), or on CPU under
    TRITON_INTERPRET=1 (slow: for checking the kernels). Off by default until a GPU benchmark shows
    it beats the per-adapter PyTorch path (`benchmarks/train_throughput.py --fused`)."""
    if os.environ.get("LORAFLEET_FUSED_LORA") != "1":
        return False
    if device.type == "cuda":
        return _passes_self_check(device)
    return INTERPRETED


@triton.jit
def _accumulate(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b: IEEE fp32 products for fp32 tiles, fp32 widening in the interpreter (see
    INTERPRETED), tensor-core products otherwise."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    elif UPCAST:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _segment_matmul_kernel(
    x_ptr, w_ptr, out_ptr,
    seg_start_ptr, seg_end_ptr, seg_slot_ptr, seg_k_ptr, seg_n_ptr,
    stride_xm, stride_xk, stride_ws, stride_wk, stride_wn, stride_om, stride_on,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[s:e, :n] = x[s:e, :k] @ w[slot][:k, :n] for segment program_id(0)."""
    segment = tl.program_id(0)
    start = tl.load(seg_start_ptr + segment)
    end = tl.load(seg_end_ptr + segment)
    slot = tl.load(seg_slot_ptr + segment)
    k_size = tl.load(seg_k_ptr + segment)
    n_size = tl.load(seg_n_ptr + segment)
    rows = start + tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    if (start + tl.program_id(1) * BM < end) & (tl.program_id(2) * BN < n_size):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, k_size, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=(rows[:, None] < end) & (ks[None, :] < k_size),
                other=0.0,
            )
            w = tl.load(
                w_ptr + slot * stride_ws + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=(ks[:, None] < k_size) & (cols[None, :] < n_size),
                other=0.0,
            )
            acc = _accumulate(acc, x, w, IEEE, UPCAST)
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < end) & (cols[None, :] < n_size),
        )


@triton.jit
def _segment_outer_kernel(
    a_ptr, b_ptr, out_ptr,
    seg_start_ptr, seg_end_ptr, seg_m_ptr, seg_n_ptr,
    stride_am, stride_ak, stride_bm, stride_bn, stride_os, stride_ok, stride_on,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[segment][:m, :n] = a[s:e, :m].T @ b[s:e, :n]: a reduction over the segment's rows."""
    segment = tl.program_id(0)
    start = tl.load(seg_start_ptr + segment)
    end = tl.load(seg_end_ptr + segment)
    m_size = tl.load(seg_m_ptr + segment)
    n_size = tl.load(seg_n_ptr + segment)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    ns = tl.program_id(2) * BN + tl.arange(0, BN)
    if (tl.program_id(1) * BM < m_size) & (tl.program_id(2) * BN < n_size):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t0 in range(start, end, BK):
            ts = t0 + tl.arange(0, BK)
            a = tl.load(
                a_ptr + ts[None, :] * stride_am + ms[:, None] * stride_ak,
                mask=(ts[None, :] < end) & (ms[:, None] < m_size),
                other=0.0,
            )
            b = tl.load(
                b_ptr + ts[:, None] * stride_bm + ns[None, :] * stride_bn,
                mask=(ts[:, None] < end) & (ns[None, :] < n_size),
                other=0.0,
            )
            acc = _accumulate(acc, a, b, IEEE, UPCAST)
        tl.store(
            out_ptr + segment * stride_os + ms[:, None] * stride_ok + ns[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=(ms[:, None] < m_size) & (ns[None, :] < n_size),
        )


class _Segments:
    """Per-segment metadata as device tensors (built once per step, see `_segments_on_device`)."""

    def __init__(self, bounds: list[tuple[int, int]], slots: list[int], ranks: list[int], device) -> None:
        self.count = len(bounds)
        self.longest = max(end - start for start, end in bounds)
        self.start = torch.tensor([start for start, _ in bounds], dtype=torch.int32, device=device)
        self.end = torch.tensor([end for _, end in bounds], dtype=torch.int32, device=device)
        self.slot = torch.tensor(slots, dtype=torch.int32, device=device)
        self.rank = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.max_rank = max(ranks)

    def full(self, value: int) -> torch.Tensor:
        return torch.full_like(self.rank, value)


def segment_matmul(x: torch.Tensor, w: torch.Tensor, segs: _Segments, k: torch.Tensor, n: torch.Tensor, n_max: int):
    """out (rows, n_max): segment i's rows times w[slot_i][:k_i, :n_i]; columns past n_i are 0."""
    out = torch.zeros(x.shape[0], n_max, dtype=w.dtype, device=x.device)
    grid = (segs.count, triton.cdiv(segs.longest, BLOCK_M), triton.cdiv(n_max, BLOCK_N))
    _segment_matmul_kernel[grid](
        x, w, out, segs.start, segs.end, segs.slot, k, n,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        IEEE=w.dtype == torch.float32, UPCAST=INTERPRETED, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )  # fmt: skip
    return out


def segment_outer(a: torch.Tensor, b: torch.Tensor, segs: _Segments, m: torch.Tensor, n: torch.Tensor, m_max, n_max):
    """out (segments, m_max, n_max): a[s:e, :m_i].T @ b[s:e, :n_i] per segment, fp32."""
    out = torch.zeros(segs.count, m_max, n_max, dtype=torch.float32, device=a.device)
    grid = (segs.count, triton.cdiv(m_max, BLOCK_N), triton.cdiv(n_max, BLOCK_N))
    _segment_outer_kernel[grid](
        a, b, out, segs.start, segs.end, m, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        IEEE=a.dtype == torch.float32, UPCAST=INTERPRETED, BM=BLOCK_N, BN=BLOCK_N, BK=BLOCK_M,
    )  # fmt: skip
    return out


_SEGMENTS: dict[tuple, _Segments] = {}


def _segments_on_device(bounds: list, slots: list, ranks: list, device: torch.device) -> _Segments:
    """Every layer of a step routes the same segments: copy their metadata to the device once per
    step, not once per layer (each copy from host memory is a synchronising transfer on CUDA)."""
    key = (tuple(bounds), tuple(slots), tuple(ranks), str(device))
    segs = _SEGMENTS.get(key)
    if segs is None:
        if len(_SEGMENTS) >= 64:
            _SEGMENTS.clear()
        segs = _SEGMENTS[key] = _Segments(bounds, slots, ranks, device)
    return segs


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, segs: _Segments, scalings: list[float], *weights):
        count = len(weights) // 2
        a_list, b_list = weights[:count], weights[count:]
        dtype = a_list[0].dtype
        x = x.to(dtype)
        in_features, out_features, r_max = x.shape[1], b_list[0].shape[0], segs.max_rank
        # stacked per slot: A.T padded to (in, r_max), scaled B.T padded to (r_max, out)
        a_t = x.new_zeros(count, in_features, r_max)
        b_t = x.new_zeros(count, r_max, out_features)
        for slot, (a, b, scaling) in enumerate(zip(a_list, b_list, scalings, strict=True)):
            a_t[slot, :, : a.shape[0]] = a.T
            b_t[slot, : b.shape[1]] = b.T * scaling
        h = segment_matmul(x, a_t, segs, segs.full(in_features), segs.rank, r_max)
        y = segment_matmul(h, b_t, segs, segs.rank, segs.full(out_features), out_features)
        ctx.save_for_backward(x, h, a_t, b_t)
        ctx.segs, ctx.count, ctx.shapes = segs, count, [(a.shape, b.shape) for a, b in zip(a_list, b_list, strict=True)]
        ctx.scalings = scalings
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, a_t, b_t = ctx.saved_tensors
        segs = ctx.segs
        in_features, out_features, r_max = x.shape[1], dy.shape[1], segs.max_rank
        dy = dy.to(x.dtype).contiguous()
        # dh = dy @ (c B) = dy @ b_t[slot].T: read b_t transposed through strides
        dh = segment_matmul(dy, b_t.transpose(1, 2), segs, segs.full(out_features), segs.rank, r_max)
        dx = segment_matmul(dh, a_t.transpose(1, 2), segs, segs.rank, segs.full(in_features), in_features)
        grad_b = segment_outer(h, dy, segs, segs.rank, segs.full(out_features), r_max, out_features)  # (c B).T grad
        grad_a = segment_outer(dh, x, segs, segs.rank, segs.full(in_features), r_max, in_features)
        slots = segs.slot.long()
        # sum per adapter (an adapter may own several segments)
        per_slot_a = x.new_zeros(ctx.count, r_max, in_features, dtype=torch.float32).index_add_(0, slots, grad_a)
        per_slot_b = x.new_zeros(ctx.count, r_max, out_features, dtype=torch.float32).index_add_(0, slots, grad_b)
        grads_a, grads_b = [], []
        for slot, ((a_shape, _b_shape), scaling) in enumerate(zip(ctx.shapes, ctx.scalings, strict=True)):
            rank = a_shape[0]
            grads_a.append(per_slot_a[slot, :rank].to(x.dtype))
            grads_b.append((per_slot_b[slot, :rank].T * scaling).to(x.dtype))
        return (dx, None, None, *grads_a, *grads_b)


_checked: dict[str, bool] = {}


def _passes_self_check(device: torch.device) -> bool:
    """Once per device: the kernels compile and agree with plain PyTorch on a small mixed-rank
    problem, forward and backward; otherwise training falls back to the reference path, with a
    warning, instead of failing or silently computing something else."""
    key = str(device)
    if key not in _checked:
        try:
            error = _self_check_error(device)
            _checked[key] = error < 1e-3
            problem = f"max relative error {error:.1e}"
        except Exception as err:  # a Triton compile or launch failure on this GPU / driver
            _checked[key], problem = False, f"{type(err).__name__}: {err}"
        if not _checked[key]:
            warnings.warn(f"fused LoRA kernels disabled on {device} ({problem}); using the PyTorch path", stacklevel=2)
    return _checked[key]


def _self_check_error(device: torch.device) -> float:
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    for name, rank in (("a", 8), ("b", 16)):
        a = torch.nn.Linear(72, rank, bias=False).to(device)
        b = torch.nn.Linear(rank, 40, bias=False).to(device)
        with torch.no_grad():
            b.weight.copy_(torch.randn(b.weight.shape, generator=generator))
        adapters[name] = LoRAWeights(a, b, torch.nn.Identity(), scaling=0.5)
    segments = (Segment("a", 0, 30), Segment(None, 30, 33), Segment("b", 33, 70))
    x = torch.randn(70, 72, generator=generator).to(device)
    results = []
    for delta_fn in (lora_delta_reference, fused_lora_delta):
        inputs = x.clone().requires_grad_(True)
        for weights in adapters.values():
            weights.lora_A.weight.grad = weights.lora_B.weight.grad = None
        delta = delta_fn(inputs, segments, adapters)
        delta.square().sum().backward()
        grads = [w.weight.grad for ws in adapters.values() for w in (ws.lora_A, ws.lora_B)]
        results.append([delta.detach(), inputs.grad, *grads])
    return max(
        float((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0))
        for ours, ref in zip(results[1], results[0], strict=True)
    )


def fused_lora_delta(x: torch.Tensor, segments, adapters: dict) -> torch.Tensor:
    """`lora_delta_reference` (without dropout) through the fused kernels. x: (rows, ..., in)."""
    rows_shape = x.shape[:-1]
    per_row = rows_shape[1:].numel() if len(rows_shape) > 1 else 1
    flat = x.reshape(-1, x.shape[-1])
    names = [s.adapter for s in segments if s.adapter in adapters]
    order = list(dict.fromkeys(names))
    bounds, slots, ranks = [], [], []
    for segment in segments:
        if segment.adapter in adapters:
            bounds.append((segment.start * per_row, segment.end * per_row))
            slots.append(order.index(segment.adapter))
            ranks.append(adapters[segment.adapter].lora_A.out_features)
    weights = [adapters[name] for name in order]
    segs = _segments_on_device(bounds, slots, ranks, x.device)
    delta = _FusedLoRA.apply(
        flat,
        segs,
        [w.scaling for w in weights],
        *[w.lora_A.weight for w in weights],
        *[w.lora_B.weight for w in weights],
    )
    return delta.view(*rows_shape, delta.shape[-1])
