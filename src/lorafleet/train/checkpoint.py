"""Fleet checkpoints: every active adapter's full training state, written atomically.

A checkpoint holds, per active adapter, weights, accumulated gradients (a checkpoint may fall in
the middle of gradient accumulation), optimizer, schedule and data position; plus the finished
adapters, the fleet step and the RNG state, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorafleet.config import FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.state import load_state, rng_state, save_state

# Held-out evaluation changes nothing about the weights: a resumed run may add, drop or change it.
NOT_TRAINING = ("eval_data", "eval_every")


def fleet_state(
    fleet_step: int,
    spec: FleetSpec,
    finished: list[str],
    losses: dict[str, list[float]],
    active: dict[str, dict],
    reference_logps: dict[str, dict[str, list[float]]],
) -> dict:
    """What a checkpoint holds: the fleet step, the adapters' specs, the finished adapters and every
    adapter's step losses, each active adapter's state (train/job.py), the RNG state, and the
    preference adapters' reference log-probabilities (so that a resumed run uses the very numbers
    the killed one computed)."""
    return {
        "fleet_step": fleet_step,
        "spec": [dataclasses.asdict(a) for a in spec.adapters],
        "finished": sorted(finished),
        "losses": losses,
        "active": active,
        "rng": rng_state(),
        "reference_logps": reference_logps,
    }


def check_same_training(state: dict, spec: FleetSpec) -> None:
    """A checkpoint resumes only the fleet it was written by (held-out evaluation may change)."""
    if [_what_trains(a) for a in state["spec"]] != [_what_trains(dataclasses.asdict(a)) for a in spec.adapters]:
        raise ConfigError("--resume: the fleet spec changed since the checkpoint; restore it or start a new output")


def _what_trains(adapter: dict) -> dict:
    """An adapter's spec as a checkpoint compares it: the fields that decide its weights."""
    return {key: value for key, value in adapter.items() if key not in NOT_TRAINING}


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
