"""A run killed after a checkpoint and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests.conftest import write_text_dataset


class Crash(Exception):
    pass


def fleet_spec(tmp_path, output: str) -> FleetSpec:
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=9 + i, seed=i) for i in range(3)]
    adapters = [
        AdapterSpec(name="a", data=str(data[0]), rank=4, micro_batch_size=2, grad_accum=3, steps=6, learning_rate=3e-3),
        AdapterSpec(name="b", data=str(data[1]), rank=2, micro_batch_size=1, steps=5, dropout=0.1, learning_rate=3e-3),
        # Waits in the queue (max_concurrent=2) and joins when "b" finishes.
        AdapterSpec(name="c", data=str(data[2]), rank=3, micro_batch_size=2, steps=7, learning_rate=3e-3),
    ]
    return FleetSpec(
        base="",
        output=str(tmp_path / output),
        adapters=adapters,
        max_concurrent=2,
        checkpoint_every=4,
        keep_checkpoints=1,
    )


def adapter_weights(result):
    return {name: load_file(path / "adapter_model.safetensors") for name, path in result.adapters.items()}


def test_killed_and_resumed_run_ends_with_the_same_adapters(tiny_lm_dir, tmp_path):
    spec = fleet_spec(tmp_path, "straight")
    spec.base = str(tiny_lm_dir)
    straight = adapter_weights(train_fleet(spec, progress=False))

    spec.output = str(tmp_path / "interrupted")

    def crash_after_step_10(step: int) -> None:
        if step == 10:  # last checkpoint at step 8, mid-accumulation for "a"
            raise Crash

    with pytest.raises(Crash):
        FleetTrainer(spec, progress=False, on_step=crash_after_step_10).run()
    resumed = adapter_weights(FleetTrainer(spec, progress=False).run(resume=True))

    assert resumed.keys() == straight.keys() == {"a", "b", "c"}
    for name in straight:
        for key, tensor in straight[name].items():
            assert (resumed[name][key] - tensor).abs().max().item() == 0.0, f"{name} {key}"


def test_a_second_run_into_the_same_output_asks_for_resume(tiny_lm_dir, tmp_path):
    spec = fleet_spec(tmp_path, "out")
    spec.base = str(tiny_lm_dir)
    with pytest.raises(Crash):
        FleetTrainer(
            spec, progress=False, on_step=lambda step: (_ for _ in ()).throw(Crash) if step == 5 else None
        ).run()
    with pytest.raises(ConfigError, match="--resume"):
        FleetTrainer(spec, progress=False).run()


def test_a_loss_that_is_no_longer_a_number_stops_training_and_saves_nothing(tiny_lm_dir, tmp_path):
    """A learning rate so large that the weights overflow: the run stops with a clear error before
    the broken adapter (or a checkpoint of it) is written."""
    from lorafleet.errors import TrainingError

    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    adapters = [AdapterSpec(name="wild", data=str(data), rank=4, steps=30, learning_rate=1e30, max_grad_norm=None)]
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "out"), adapters=adapters, checkpoint_every=0)
    with pytest.raises(TrainingError, match="adapter 'wild': the loss became"):
        train_fleet(spec, progress=False)
    assert not (tmp_path / "out" / "adapters" / "wild").exists()
