"""Held-out loss during training, and TensorBoard event files beside metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.errors import ConfigError
from lorafleet.models.loading import load_base
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset


class Crash(Exception):
    pass


@pytest.fixture
def spec(tiny_lm_dir, tmp_path) -> FleetSpec:
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=9 + i, seed=i) for i in range(2)]
    held_out = [write_text_dataset(tmp_path / f"held{i}.jsonl", n=5 + i, seed=10 + i) for i in range(2)]
    adapters = [
        # dropout draws on the RNG in every training step: evaluating must not shift that stream
        AdapterSpec(
            name="a",
            data=str(data[0]),
            eval_data=str(held_out[0]),
            eval_every=2,
            rank=4,
            micro_batch_size=2,
            steps=5,
            dropout=0.1,
            learning_rate=3e-3,
        ),
        AdapterSpec(name="b", data=str(data[1]), eval_data=str(held_out[1]), rank=2, steps=6, learning_rate=3e-3),
        AdapterSpec(name="c", data=str(data[1]), rank=2, steps=3, learning_rate=3e-3),
    ]
    return FleetSpec(
        base=str(tiny_lm_dir),
        output=str(tmp_path / "run"),
        adapters=adapters,
        checkpoint_every=4,
        report_to=["tensorboard"],
    )


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def held_out_loss_by_peft(model_dir, adapter_dir, data) -> float:
    """The reference: the saved adapter loaded by peft, each held-out record alone, token-weighted."""
    base = load_base(model_dir, device="cpu")
    model = PeftModel.from_pretrained(base.model, adapter_dir)
    examples, _ = load_examples(data, base)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            batch = collate([example], base.tokenizer.pad_token_id)
            count = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch.model_inputs(), labels=batch.labels).loss.item() * count
            tokens += count
    return total / tokens


def test_held_out_loss_is_the_saved_adapters_loss_and_leaves_training_untouched(spec, tiny_lm_dir, tmp_path):
    result = train_fleet(spec, progress=False)
    records = metrics(tmp_path / "run")
    evaluated = {(r["adapter"], r["step"]): r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evaluated) == [("a", 2), ("a", 4), ("a", 5), ("b", 6)]  # every eval_every, and the last step
    assert all(r["grad_norm"] > 0 for r in records)

    for name in ("a", "b"):
        adapter = next(a for a in spec.adapters if a.name == name)
        final = evaluated[(name, adapter.steps)]
        reference = held_out_loss_by_peft(tiny_lm_dir, result.adapters[name], adapter.eval_data)
        # the same weights, forward only, batched differently: float32 rounding, nothing amplified
        layers = json.loads((tiny_lm_dir / "config.json").read_text())["num_hidden_layers"]
        assert final == pytest.approx(reference, rel=tolerances.float32_gradients(layers))
    assert evaluated[("a", 2)] != evaluated[("a", 4)]  # measured on the weights of that step

    # The same fleet without held-out data trains to the very same weights (dropout included).
    plain = dataclasses.replace(spec, output=str(tmp_path / "plain"), report_to=[])
    plain.adapters = [dataclasses.replace(a, eval_data=None, eval_every=None) for a in spec.adapters]
    without = train_fleet(plain, progress=False)
    for name, directory in result.adapters.items():
        ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (directory, without.adapters[name]))
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


def test_tensorboard_holds_what_metrics_jsonl_holds_even_after_a_resume(spec, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight = dataclasses.replace(spec, output=str(tmp_path / "straight"))
    train_fleet(straight, progress=False)

    def crash(step: int) -> None:
        if step == 6:  # after the checkpoint at fleet step 4: steps 5 and 6 are logged, then lost
            raise Crash

    with pytest.raises(Crash):
        FleetTrainer(spec, progress=False, on_step=crash).run()
    FleetTrainer(spec, progress=False).run(resume=True)

    expected = metrics(tmp_path / "straight")
    resumed = metrics(tmp_path / "run")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(expected)

    for name in ("a", "b", "c"):
        assert len(list((tmp_path / "run" / "tensorboard" / name).iterdir())) == 1  # written afresh on resume
        events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / name))
        events.Reload()
        ours = [r for r in expected if r["adapter"] == name]
        logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
        # TensorBoard keeps float32: one rounding of the logged value
        assert logged == [(r["step"], pytest.approx(r["loss"], rel=tolerances.FLOAT32_UNIT_ROUNDOFF)) for r in ours]
        assert [e.step for e in events.Scalars("train/lr")] == [r["step"] for r in ours]
        if name == "a":
            assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 5]


def test_eval_settings_are_checked():
    from lorafleet.config import fleet_spec_from_dict

    raw = {"base": "b", "output": "o", "adapters": [{"name": "x", "data": "d.jsonl", "eval_every": 10}]}
    with pytest.raises(ConfigError, match="eval_every needs eval_data"):
        fleet_spec_from_dict(raw)
    with pytest.raises(ConfigError, match="report_to wandb is not one of tensorboard"):
        fleet_spec_from_dict({**raw, "adapters": [{"name": "x", "data": "d.jsonl"}], "report_to": "wandb"})


def test_a_resumed_run_may_add_held_out_data(spec):
    held_out = {a.name: a.eval_data for a in spec.adapters}
    for adapter in spec.adapters:
        adapter.eval_data, adapter.eval_every = None, None
    with pytest.raises(Crash):
        FleetTrainer(
            spec, progress=False, on_step=lambda step: (_ for _ in ()).throw(Crash) if step == 5 else None
        ).run()
    spec.adapters[1].eval_data = held_out["b"]
    FleetTrainer(spec, progress=False).run(resume=True)
    evaluated = [(r["adapter"], r["step"]) for r in metrics(Path(spec.output)) if "eval_loss" in r]
    assert evaluated == [("b", 6)]
