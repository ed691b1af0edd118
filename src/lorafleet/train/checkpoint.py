"""Fleet checkpoints: every active adapter's full training state, written atomically.

A checkpoint holds, per active adapter, weights, accumulated gradients (a checkpoint may fall in
the middle of gradient accumulation), optimizer, schedule and data position; plus the finished
adapters, the fleet step and the RNG state, so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.fleet_dir import FleetDir
from lorafleet.state import load_state, save_state


def checkpoint_dir(output: str | Path) -> Path:
    return FleetDir(output).checkpoints


def save_checkpoint(output: str | Path, state: dict, keep: int) -> Path:
    directory = checkpoint_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    path = save_state(state, FleetDir(output).checkpoint(state["fleet_step"]))
    for old in list_checkpoints(output)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def list_checkpoints(output: str | Path) -> list[Path]:
    return FleetDir(output).checkpoint_files()


def latest_checkpoint(output: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path) -> dict:
    return load_state(path)
