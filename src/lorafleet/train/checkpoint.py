"""Fleet checkpoints: every active adapter's full training state, written atomically.

A checkpoint holds, per active adapter, weights, accumulated gradients (a checkpoint may fall in
the middle of gradient accumulation), optimizer, schedule and data position; plus the finished
adapters, the fleet step and the RNG state, so a resumed run continues exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def save_checkpoint(output: str | Path, state: dict, keep: int) -> Path:
    directory = checkpoint_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{state['fleet_step']:08d}.pt"
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a truncated checkpoint behind
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def list_checkpoints(output: str | Path) -> list[Path]:
    directory = checkpoint_dir(output)
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(output: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
