"""Training state on disk: written atomically, with the random-number state that makes a resumed
run continue exactly. The fleet trainer's checkpoints (train/checkpoint.py) and distillation's
(compress/distil.py) both use it."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_state(state: dict, path: Path) -> Path:
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a truncated file."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """The CPU generator's state and every GPU's (dropout, shuffling drawn on the device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict | torch.Tensor) -> None:
    if isinstance(state, torch.Tensor):  # written before the GPU state was kept too
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
