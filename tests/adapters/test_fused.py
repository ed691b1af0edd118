"""The fused Triton multi-adapter LoRA equals the plain-PyTorch layer, forward and backward.

Without a GPU the kernels run in Triton's interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton (shipped with CUDA builds of PyTorch)")

from lorafleet.adapters import fused  # noqa: E402
from lorafleet.adapters.reference import LoRAWeights, lora_delta_reference  # noqa: E402
from lorafleet.segments import Segment  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def make_adapters(in_features, out_features, ranks, dtype, generator):
    adapters = {}
    for index, rank in enumerate(ranks):
        a = torch.nn.Linear(in_features, rank, bias=False, device=DEVICE, dtype=dtype)
        b = torch.nn.Linear(rank, out_features, bias=False, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            a.weight.copy_(torch.randn(a.weight.shape, generator=generator) / in_features**0.5)
            b.weight.copy_(torch.randn(b.weight.shape, generator=generator) / rank**0.5)
        adapters[f"a{index}"] = LoRAWeights(a, b, torch.nn.Identity(), scaling=2.0 / (index + 1))
    return adapters


def run(delta_fn, x, segments, adapters):
    x = x.detach().clone().requires_grad_(True)
    for weights in adapters.values():
        weights.lora_A.weight.grad = weights.lora_B.weight.grad = None
    delta = delta_fn(x, segments, adapters)
    upstream = torch.randn(delta.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, delta.dtype)
    (delta.float() * upstream.float()).sum().backward()
    grads = {name: (w.lora_A.weight.grad.clone(), w.lora_B.weight.grad.clone()) for name, w in adapters.items()}
    return delta.detach(), x.grad.detach(), grads


def assert_close(ours, reference, dtype, what):
    scale = reference.float().abs().max().clamp(min=1.0)
    error = (ours.float() - reference.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        # rows, tokens per row, in, out: odd sizes that fill no block exactly
        (9, 1, 72, 40),
        (5, 7, 48, 136),
    ],
    ids=["tokens", "rows-of-sequences"],
)
def test_fused_lora_matches_the_reference_layer(dtype, shape):
    rows, tokens, in_features, out_features = shape
    generator = torch.Generator().manual_seed(0)
    adapters = make_adapters(in_features, out_features, [8, 16, 64], dtype, generator)
    # unequal segments, a base-only segment, and one adapter owning two segments
    cuts = {9: [0, 1, 4, 5, 8, 9], 5: [0, 1, 2, 3, 4, 5]}[rows]
    owners = ["a1", None, "a0", "a2", "a1"]
    segments = tuple(Segment(owner, cuts[i], cuts[i + 1]) for i, owner in enumerate(owners))
    x = torch.randn(rows, tokens, in_features, generator=generator).squeeze(1).to(DEVICE, dtype)

    reference = run(lora_delta_reference, x, segments, adapters)
    ours = run(fused.fused_lora_delta, x, segments, adapters)

    assert_close(ours[0], reference[0], dtype, "delta")
    assert_close(ours[1], reference[1], dtype, "grad x")
    for name in adapters:
        assert_close(ours[2][name][0], reference[2][name][0], dtype, f"grad A {name}")
        assert_close(ours[2][name][1], reference[2][name][1], dtype, f"grad B {name}")
    base_rows = slice(cuts[1], cuts[2])
    assert torch.all(ours[0][base_rows] == 0) and torch.all(ours[1][base_rows] == 0)


def test_the_self_check_that_guards_the_gpu_path_passes_here():
    assert fused._self_check_error(DEVICE) < 1e-5
