"""A sweep ranked on a number other than the held-out loss: a DPO department's held-out reward
margin, where higher is better — the rungs keep the highest, the highest final one wins."""

from __future__ import annotations

import json

import pytest

from lorafleet.errors import ConfigError
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import sweep_spec_from_dict
from tests.conftest import write_text_dataset
from tests.sweep.test_sweep import plain_asha
from tests.train.test_preference import model_dir, write_pairs  # noqa: F401 (model_dir: a fixture)

BUDGET, MIN_STEPS, REDUCTION = 6, 2, 2  # rungs at steps 2 and 4


def dpo_sweep_file(data, eval_data, output, base, metric: str = "eval_reward_margin") -> dict:
    return {
        "base": str(base),
        "output": str(output),
        "department": "colours",
        "adapter": {
            "data": str(data),
            "eval_data": str(eval_data),
            "objective": "dpo",
            "beta": 0.5,
            "steps": BUDGET,
            "micro_batch_size": 4,
            "rank": 4,
            "target_modules": ["q_proj", "v_proj"],
        },
        "space": {"learning_rate": {"choice": [1e-5, 3e-4, 1e-4, 3e-3]}},
        "sampler": "grid",
        "metric": metric,
        "asha": {"min_steps": MIN_STEPS, "reduction_factor": REDUCTION},
        "fleet": {"max_concurrent": 2},
    }


def test_a_reward_margin_sweep_keeps_the_highest_at_the_rungs_and_crowns_the_highest(model_dir, tmp_path):  # noqa: F811
    data, eval_data = write_pairs(tmp_path / "train.jsonl", n=16, seed=0), write_pairs(tmp_path / "held.jsonl", 8, 7)
    spec = sweep_spec_from_dict(dpo_sweep_file(data, eval_data, tmp_path / "out", model_dir), "sweep.yaml")
    result = run_sweep(spec, progress=False)["colours"]
    lines = [json.loads(line) for line in (spec.output / "trials" / "metrics.jsonl").read_text().splitlines()]
    # the plain ASHA ranks lowest first: over the negated margins it keeps the highest
    arrivals = [
        (r["fleet_step"], r["adapter"], r["step"], -r["eval_reward_margin"])
        for r in lines
        if "eval_reward_margin" in r and r["step"] < BUDGET
    ]
    expected = plain_asha(arrivals, [2, 4], REDUCTION)
    assert [(d["trial"], d["step"], d["continues"]) for d in result.record["decisions"]] == expected
    assert any(not continues for _, _, continues in expected), "no trial stopped: this test checks nothing"
    finished = {t.name: t.final for t in result.trials if t.stopped_at is None}
    assert len(finished) >= 1
    assert result.winner == max(finished, key=finished.get)
    assert result.record["winner"]["why"].startswith("highest final eval_reward_margin")


def test_a_metric_the_objective_does_not_report_names_what_it_does(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 8, seed=0)
    raw = dpo_sweep_file(data, data, tmp_path / "out", tiny_lm_dir, metric="eval_reward_accuracy")
    raw["adapter"] = {key: value for key, value in raw["adapter"].items() if key not in ("objective", "beta")}
    with pytest.raises(
        ConfigError, match=r"'eval_reward_accuracy' is not reported .* its held-out pass reports eval_loss"
    ):
        sweep_spec_from_dict(raw, "sweep.yaml")
