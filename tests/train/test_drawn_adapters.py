"""Adapters drawn while the fleet trains (`next_adapter`, a sweep's trials asked as slots open), and
adapters reading one file sharing its loaded items."""

from __future__ import annotations

from pathlib import Path

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.train.trainer import FleetTrainer
from tests.conftest import write_text_dataset


def adapter(name: str, data: Path, eval_data: Path, steps: int = 2) -> AdapterSpec:
    return AdapterSpec(name=name, data=str(data), eval_data=str(eval_data), rank=2, steps=steps, micro_batch_size=2)


def test_adapters_reading_one_file_share_its_loaded_items(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 6, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 2, seed=1)
    names = ("t0", "t1", "t2")
    spec = FleetSpec(str(tiny_lm_dir), str(tmp_path / "out"), [adapter(name, data, eval_data) for name in names])
    trainer = FleetTrainer(spec, progress=False)
    first, *others = [trainer.examples[name] for name in names]
    assert len(first) == 6 and all(items is first for items in others)  # read and tokenised once
    held_out = [trainer.held_out.examples[name] for name in names]
    assert all(items is held_out[0] for items in held_out)


def test_adapters_drawn_as_slots_open_train_like_listed_ones(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 6, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 2, seed=1)
    spec = FleetSpec(
        str(tiny_lm_dir), str(tmp_path / "out"), [adapter("listed", data, eval_data, steps=3)], max_concurrent=2
    )
    asked = []  # (the adapter drawn, the fleet step, the adapters running when it was asked)

    def next_adapter() -> AdapterSpec | None:
        if len(asked) == 3:
            return None
        name = f"drawn{len(asked)}"
        asked.append((name, trainer.fleet_step, [job.name for job in trainer.active]))
        return adapter(name, data, eval_data)

    trainer = FleetTrainer(spec, progress=False, next_adapter=next_adapter)
    result = trainer.run()
    # asked only with a slot free and nothing queued: beside the listed one at the start, then as
    # the two-step drawn0 finishes (step 2) and as the three-step listed one does (step 3)
    assert asked == [("drawn0", 0, ["listed"]), ("drawn1", 2, ["listed"]), ("drawn2", 3, ["drawn1"])]
    assert [a.name for a in spec.adapters] == ["listed", "drawn0", "drawn1", "drawn2"]
    assert set(result.adapters) == {"listed", "drawn0", "drawn1", "drawn2"}
    assert all(len(result.losses[name]) == 2 for name in ("drawn0", "drawn1", "drawn2"))
    assert trainer.examples["drawn2"] is trainer.examples["listed"]
