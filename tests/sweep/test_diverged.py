"""A sweep's trial whose loss stops being a number stops alone: it is not saved, its metrics line
and sweep.json say it diverged, its slot goes to the next queued trial, it cannot win, and the
trial that trained beside it equals its configuration trained alone (outside a sweep the same
loss stops the whole run: tests/train/test_resume.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.config import FleetSpec
from lorafleet.fleet_dir import FleetDir, fleet_adapters
from lorafleet.governance.audit import verify_chain
from lorafleet.report import sweep_figure
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import sweep_spec_from_dict
from lorafleet.train.trainer import train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset

BUDGET = 4
WILD = 1e300  # float64 weights overflow in the second step (no clipping): the loss becomes nan


@pytest.fixture(scope="module")
def diverging_sweep(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverging")
    data = write_text_dataset(root / "train.jsonl", 24, seed=0)
    eval_data = write_text_dataset(root / "eval.jsonl", 6, seed=1)
    raw = {
        "base": str(tiny_lm_dir),
        "output": str(root / "out"),
        "department": "finance",
        "adapter": {
            "data": str(data),
            "eval_data": str(eval_data),
            "steps": BUDGET,
            "micro_batch_size": 2,
            "seed": 1,
            "max_grad_norm": None,
        },
        # the wild trial trains beside trial01; trial02 waits for a slot
        "space": {"learning_rate": {"choice": [WILD, 5e-3, 1e-3]}},
        "sampler": "grid",
        "asha": {"min_steps": 2, "reduction_factor": 2},
        "fleet": {"max_concurrent": 2},
    }
    spec = sweep_spec_from_dict(raw, "sweep.yaml")
    spec.fleet.dtype = "float64"  # for the comparison with the lone run
    return spec, run_sweep(spec, progress=False)["finance"]


def test_a_diverged_trial_stops_alone_unsaved_and_cannot_win(diverging_sweep):
    spec, result = diverging_sweep
    trials = {t.name: t for t in result.trials}
    wild = trials["finance-trial00"]
    assert wild.diverged and wild.stopped_at is not None and wild.stopped_at < BUDGET
    assert result.winner != wild.name
    assert result.record["diverged"] == [wild.name]
    assert next(t for t in result.record["trials"] if t["name"] == wild.name)["diverged"] is True
    assert "finance-trial00 diverged" in result.record["winner"]["why"]
    assert not any(t.diverged for t in result.trials if t.name != wild.name)
    assert all(t.steps == BUDGET for t in result.trials if t.stopped_at is None)
    # never saved: its weights are not numbers
    assert wild.name not in fleet_adapters(Path(spec.fleet.output))
    assert not FleetDir(spec.fleet.output).adapter(wild.name).exists()
    lines = [json.loads(line) for line in FleetDir(spec.fleet.output).metrics.read_text().splitlines()]
    broke = [r for r in lines if r["adapter"] == wild.name and r.get("diverged")]
    assert len(broke) == 1 and broke[0]["stopped"] and broke[0]["diverged_loss"] in ("nan", "inf", "-inf")
    assert all(r["fleet_step"] <= broke[0]["fleet_step"] for r in lines if r["adapter"] == wild.name)
    # its slot goes to the queued trial, which trains from the next fleet step
    first_step = min(r["fleet_step"] for r in lines if r["adapter"] == "finance-trial02")
    assert first_step == broke[0]["fleet_step"] + 1
    verify_chain(FleetDir(spec.fleet.output).audit)  # the trials' audit log records it and stays whole


def test_the_trial_beside_a_diverged_one_equals_its_configuration_alone(diverging_sweep, tmp_path):
    """Its rows shared every step with rows whose numbers overflowed: nothing of them may leak."""
    spec, result = diverging_sweep
    beside = next(a for a in spec.fleet.adapters if a.name == "finance-trial01")
    alone_spec = FleetSpec(
        base=spec.fleet.base,
        output=str(tmp_path / "alone"),
        adapters=[dataclasses.replace(beside)],
        dtype="float64",
        checkpoint_every=0,
    )
    alone = train_fleet(alone_spec, progress=False)
    ours = [json.loads(line) for line in FleetDir(spec.fleet.output).metrics.read_text().splitlines()]
    ours = [r for r in ours if r["adapter"] == beside.name]
    theirs = [json.loads(line) for line in FleetDir(alone_spec.output).metrics.read_text().splitlines()]
    weight_tolerance = tolerances.trained_weights(beside.learning_rate, BUDGET)
    reference = load_file(alone.adapters[beside.name] / "adapter_model.safetensors")
    parameters = sum(t.numel() for t in reference.values())
    loss_tolerance = tolerances.metric(weight_tolerance, parameters, max(r["grad_norm"] for r in theirs))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs][: len(ours)]
    for a, b in zip(ours, theirs, strict=False):
        for key in ("loss", "eval_loss"):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert abs(a[key] - b[key]) <= loss_tolerance * max(1.0, abs(b[key])), (a["step"], key)
    # first at the only rung (step 2), it continues and trains its whole budget
    assert next(t for t in result.trials if t.name == beside.name).stopped_at is None
    saved = load_file(FleetDir(spec.fleet.output).adapter(beside.name) / "adapter_model.safetensors")
    tolerances.assert_same_weights({"w": saved}, {"w": reference}, weight_tolerance)


def test_the_report_of_the_sweeps_output_and_the_model_card_mark_the_diverged_trial(diverging_sweep, capsys):
    """`lorafleet report <output>` draws the sweep's page (the trials' metrics lie in trials/)."""
    spec, result = diverging_sweep
    wild = next(t for t in result.trials if t.diverged)
    assert main(["report", str(spec.output)]) == 0
    page = FleetDir(spec.output).report.read_text()
    assert "<h2>Sweep of finance</h2>" in page and "<h2>Loss and learning rate</h2>" in page
    row = re.search(rf"<tr><td>{wild.name} \(diverged\)</td>(.*?)</tr>", page)
    assert row and f"diverged at step {wild.stopped_at + 1}: the loss was no longer a number" in row.group(1)
    labels = {line.get_label() for line in sweep_figure(result.record).axes[0].get_lines()}
    assert f"{wild.name} (diverged)" in labels
    assert main(["docs", "finance", "--fleet", str(spec.output)]) == 0
    card = (result.adapter / "README.md").read_text()
    assert f"| `{wild.name}` |" in card
    row = next(line for line in card.splitlines() if line.startswith(f"| `{wild.name}` |"))
    assert row.endswith(f"| diverged at step {wild.stopped_at + 1} (the loss was no longer a number) |"), row
