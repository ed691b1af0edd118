"""A model of one `q_proj` linear, so that peft can wrap a single layer for the layer-level tests."""

from __future__ import annotations

import torch
from torch import nn


class OneProjection(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.q_proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)
