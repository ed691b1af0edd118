"""PiSSA and OLoRA initialisation in a fleet that shares one base.

peft starts a PiSSA (or OLoRA) adapter from the base's own principal directions, A0 and B0 from an
SVD (a QR) of W, and keeps the base exact by replacing W with the residual W - s·B0·A0. A fleet
cannot change the base: every other adapter (and the base's own rows) trains and serves on W. So
each such adapter keeps its residual to itself: its rows compute

    W·x + s·B·A·x - s·B0·A0·x  =  W·x + s·[B, -B0]·[A; A0]·x

which is peft's output on its residual base, and a LoRA adapter of twice the rank whose second
half is frozen. Every path of the layer (batched, fused, stacked, the engine's stacks, DoRA's
norms) sees exactly that through `Combined` factors; the optimizer sees A and B alone. Saved, it
is what peft's `path_initial_model_for_weight_conversion` writes: the plain LoRA [A; A0], [B, -B0]
of rank 2r (alpha doubled, or times sqrt(2) with rsLoRA, so the scaling stays), which peft and
vLLM load on the unchanged base. The cost is twice the rank in each LoRA matmul of that adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FROM_THE_BASE = ("pissa", "olora")  # inits that take directions out of the base's weight


def principal_factors(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) as peft's `pissa_init` / `olora_init` compute them, in float32
    from the (out, in) base weight: s·B0·A0 is the part of W the adapter takes over."""
    weight = weight.detach().to(torch.float32)
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)
        return torch.diag(root) @ uh[:rank], v[:, :rank] @ torch.diag(root)
    q, r = torch.linalg.qr(weight)  # olora
    return r[:rank].contiguous(), q[:, :rank].contiguous()


class Initial(nn.Module):
    """The frozen initial factors of one adapter on one layer (buffers: they move with the layer
    and stay out of its parameters and state dict)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lora_A", lora_A, persistent=False)  # A0 (r, in)
        self.register_buffer("negated_B", -lora_B, persistent=False)  # -B0 (out, r)


class Combined:
    """A factor as every path of the layer sees it: the trained [A; A0] or [B, -B0] (r doubled),
    recomputed from the trained weight on each use so its gradient reaches A or B alone."""

    def __init__(self, trainable: nn.Linear, initial: Initial, which: str) -> None:
        self.trainable, self.initial, self.which = trainable, initial, which

    @property
    def weight(self) -> torch.Tensor:
        trained = self.trainable.weight
        if self.which == "lora_A":
            return torch.cat([trained, self.initial.lora_A.to(trained.dtype)], dim=0)
        return torch.cat([trained, self.initial.negated_B.to(trained.dtype)], dim=1)

    @property
    def out_features(self) -> int:
        return self.trainable.out_features * (2 if self.which == "lora_A" else 1)

    @property
    def in_features(self) -> int:
        return self.trainable.in_features * (2 if self.which == "lora_B" else 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def weight_version(factor: nn.Linear | Combined) -> tuple[int, int]:
    """(storage, version) of a factor's trained weight: what caches of weights derived from it key on."""
    weight = factor.trainable.weight if isinstance(factor, Combined) else factor.weight
    return weight.data_ptr(), weight._version


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scaling of an adapter saved at twice its rank, as peft converts it."""
    return alpha * 2**0.5 if use_rslora else alpha * 2
