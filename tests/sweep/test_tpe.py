"""A TPE sweep asks Optuna for each trial when a slot opens, after telling it every rung decided so
far, and the same seed gives the same trials and the same winner; departments mixing samplers take
turns as slots open, each TPE department with a study of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.sweep.plan import plan_sweep
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import sweep_spec_from_dict
from lorafleet.train.checkpoint import load_checkpoint
from tests.conftest import write_text_dataset

pytest.importorskip("optuna")

BUDGET, TRIALS = 4, 6  # rungs at steps 1 and 2; two trials at a time, so four are asked as slots open
LEARNING_RATES = [1e-3, 3e-2]
RANKS = [2, 4]
TARGETS = [["q_proj"], ["q_proj", "v_proj"]]


def tpe_file(data: Path, eval_data: Path, output: Path, base: Path) -> dict:
    return {
        "base": str(base),
        "output": str(output),
        "department": "legal",
        "adapter": {"data": str(data), "eval_data": str(eval_data), "steps": BUDGET, "micro_batch_size": 2, "seed": 1},
        "space": {
            "learning_rate": {"log_uniform": LEARNING_RATES},
            "rank": {"choice": RANKS},
            "target_modules": {"choice": TARGETS},
        },
        "sampler": "tpe",
        "trials": TRIALS,
        "startup_trials": 2,  # TPE models the rungs from the third trial on
        "seed": 5,
        "asha": {"min_steps": 1, "reduction_factor": 2},
        "fleet": {"max_concurrent": 2},
    }


@pytest.fixture(scope="module")
def two_sweeps(tiny_lm_dir, tmp_path_factory):
    """The same TPE sweep run twice, into two outputs: each run's sweep and its department's outcome."""
    root = tmp_path_factory.mktemp("tpe")
    data = write_text_dataset(root / "train.jsonl", 12, seed=0)
    eval_data = write_text_dataset(root / "eval.jsonl", 4, seed=1)
    runs = []
    for output in ("first", "second"):
        spec = sweep_spec_from_dict(tpe_file(data, eval_data, root / output, tiny_lm_dir), "sweep.yaml")
        result = run_sweep(spec, progress=False)["legal"]
        runs.append((spec, result))
    return runs


def metric_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def test_the_same_seed_draws_the_same_trials_and_crowns_the_same_winner(two_sweeps):
    (first, first_result), (second, second_result) = two_sweeps
    assert len(first.departments["legal"].trials) == TRIALS
    assert first.departments["legal"].trials == second.departments["legal"].trials
    assert first_result.winner == second_result.winner
    assert [t.curve for t in first_result.trials] == [t.curve for t in second_result.trials]


def test_tpe_values_respect_the_space_and_become_the_trials_settings(two_sweeps):
    (spec, result), _ = two_sweeps
    adapters = {adapter.name: adapter for adapter in spec.fleet.adapters}
    assert (
        list(adapters)
        == list(spec.departments["legal"].trials)
        == [f"legal-trial{index:02d}" for index in range(TRIALS)]
    )
    for name, values in spec.departments["legal"].trials.items():
        assert LEARNING_RATES[0] <= values["learning_rate"] <= LEARNING_RATES[1]
        assert values["rank"] in RANKS and values["target_modules"] in TARGETS
        adapter = adapters[name]
        assert (adapter.learning_rate, adapter.rank, adapter.target_modules) == (
            values["learning_rate"],
            values["rank"],
            values["target_modules"],
        )
    assert len({values["learning_rate"] for values in spec.departments["legal"].trials.values()}) == TRIALS
    assert result.record["sampler"] == "tpe" and result.record["tpe"]["startup_trials"] == 2


def test_each_trial_is_asked_after_the_study_is_told_every_rung_decided_before_it(two_sweeps):
    (spec, result), _ = two_sweeps
    lines = metric_lines(spec.fleet.output)
    joined = {}  # trial -> the fleet step of its first optimizer step: asked after the step before
    ended = {}  # trial -> the fleet step of its last line: stopped at a rung, or its budget trained
    for line in lines:
        joined.setdefault(line["adapter"], line["fleet_step"])
        ended[line["adapter"]] = line["fleet_step"]
    informed_by = result.record["tpe"]["informed_by"]
    for trial in spec.departments["legal"].trials:
        told_before = {other for other, end in ended.items() if end < joined[trial]}
        assert set(informed_by[trial]) == told_before, trial
    stopped = {t.name for t in result.trials if t.stopped_at is not None}
    late = [trial for trial in spec.departments["legal"].trials if set(informed_by[trial]) & stopped]
    assert late, "no trial was asked after a stopped one, or this test checks nothing"
    # what the study held when those were asked: each stopped trial pruned, with its rungs' numbers
    # as intermediate values; each finished one complete, with its final number
    study = {f"legal-trial{t.number:02d}": t for t in result.study.trials}
    for trial in result.trials:
        told = study[trial.name]
        assert told.intermediate_values == dict(trial.curve)
        if trial.name in stopped:
            assert told.state.name == "PRUNED"
        else:
            assert told.state.name == "COMPLETE" and told.value == trial.final
    for trial in late:
        for earlier in informed_by[trial]:
            assert study[earlier].datetime_complete <= study[trial].datetime_start


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trials": None}, "the tpe sampler needs 'trials'"),
        ({"startup_trials": 0}, "startup_trials must be a whole number of at least 1"),
        ({"sampler": "random"}, "startup_trials is for sampler: tpe only"),
        ({"space": {"rank": {"choice": [2]}, "learning_rat": {"uniform": [0, 1]}}}, "'learning_rat' is not a"),
    ],
)
def test_a_wrong_tpe_sweep_file_names_the_field(tmp_path, change, message):
    raw = tpe_file(tmp_path / "d.jsonl", tmp_path / "e.jsonl", tmp_path / "out", tmp_path / "base") | change
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        sweep_spec_from_dict(raw, "sweep.yaml")


def test_tpe_without_optuna_names_the_extra_to_install(tmp_path, monkeypatch):
    raw = tpe_file(tmp_path / "d.jsonl", tmp_path / "e.jsonl", tmp_path / "out", tmp_path / "base")
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed: importing it fails
    with pytest.raises(
        ConfigError, match=r"sampler: tpe needs optuna, an optional extra: pip install 'lorafleet\[sweep\]'"
    ):
        sweep_spec_from_dict(raw, "sweep.yaml")


def mixed_departments(data: Path, eval_data: Path, output: Path, base: Path) -> dict:
    """finance listed by the grid, legal and hr drawn by TPE (each its own study and seed)."""
    tpe = {"sampler": "tpe", "trials": 2, "startup_trials": 1}
    return {
        "base": str(base),
        "output": str(output),
        "adapter": {"data": str(data), "eval_data": str(eval_data), "steps": BUDGET, "micro_batch_size": 2, "seed": 1},
        "space": {"learning_rate": {"log_uniform": LEARNING_RATES}, "rank": {"choice": RANKS}},
        "asha": {"min_steps": 1, "reduction_factor": 2},
        "departments": {
            "finance": {"sampler": "grid", "space": {"rank": {"choice": RANKS[:1]}}},  # one trial
            "legal": {**tpe, "seed": 5},
            "hr": {**tpe, "seed": 6},
        },
        "fleet": {"max_concurrent": 3},
    }


def test_departments_mixing_samplers_take_turns_and_each_study_holds_only_its_own_trials(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    spec = sweep_spec_from_dict(mixed_departments(data, eval_data, tmp_path / "out", tiny_lm_dir), "sweep.yaml")
    results = run_sweep(spec, progress=False, retrain_full=True)
    legal, hr = spec.departments["legal"].trials, spec.departments["hr"].trials
    assert list(legal) == ["legal-trial00", "legal-trial01"] and list(hr) == ["hr-trial00", "hr-trial01"]
    # every trial joined as a slot opened, the departments in turn while each had trials left
    joined = [adapter.name for adapter in spec.fleet.adapters]
    assert joined == ["finance-trial00", "legal-trial00", "hr-trial00", "legal-trial01", "hr-trial01"]
    assert results["finance"].study is None and "tpe" not in results["finance"].record
    for department, trials in (("legal", legal), ("hr", hr)):
        result = results[department]
        # the study was asked and told this department's trials alone: its numbers are their curves
        told = {f"{department}-trial{t.number:02d}": t for t in result.study.trials}
        assert set(told) == set(trials)
        assert {t.name: dict(t.curve) for t in result.trials} == {n: t.intermediate_values for n, t in told.items()}
        assert all(set(before) <= set(trials) for before in result.record["tpe"]["informed_by"].values())
        assert result.record["sampler"] == "tpe" and result.winner in trials
        assert {d["trial"] for d in result.record["decisions"]} <= set(trials)
    # the winners' configurations (drawn ones too) trained again on all the data
    assert {d: r.record["retrained"]["trial"] for d, r in results.items()} == {d: r.winner for d, r in results.items()}
    # the drawn trials trained in the trials' fleet; the output's adapters are the departments' alone
    trials_fleet, output = FleetDir(tmp_path / "out" / "trials"), FleetDir(tmp_path / "out")
    assert all(trials_fleet.adapter(trial).is_dir() for trial in [*legal, *hr])
    assert sorted(path.name for path in output.adapters.iterdir()) == ["finance", "hr", "legal"]
    for result in results.values():
        assert result.record["winner"]["trial_directory"] == str(Path("trials") / "adapters" / result.winner)
    sweep_file = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [record["sampler"] for record in sweep_file["departments"]] == ["grid", "tpe", "tpe"]


WILD = 1e300  # float64 weights overflow in the second step without clipping: the loss becomes nan


def test_a_diverged_trial_is_told_to_its_study_as_failed_before_the_next_draw(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    raw = tpe_file(data, eval_data, tmp_path / "out", tiny_lm_dir)
    raw["adapter"]["max_grad_norm"] = None
    # seed 0's random start draws the second choice first, then the first: the wild trial, then a sane one
    raw |= {"space": {"learning_rate": {"choice": [5e-3, WILD]}}, "trials": 2, "startup_trials": 10, "seed": 0}
    raw["fleet"] = {"max_concurrent": 1}  # the second trial is drawn only once the wild one has stopped
    raw["asha"] = {"min_steps": 2, "reduction_factor": 2}  # no rung before its loss breaks in the second step
    spec = sweep_spec_from_dict(raw, "sweep.yaml")
    spec.fleet.dtype = "float64"
    result = run_sweep(spec, progress=False)["legal"]
    trials = spec.departments["legal"].trials
    assert [values["learning_rate"] for values in trials.values()] == [WILD, 5e-3]
    assert [t.diverged for t in result.trials] == [True, False] and result.winner == "legal-trial01"
    states = {f"legal-trial{t.number:02d}": t.state.name for t in result.study.trials}
    assert states == {"legal-trial00": "FAIL", "legal-trial01": "COMPLETE"}
    # told before the next trial was asked: TPE drew it knowing the wild one failed
    assert result.record["tpe"]["informed_by"]["legal-trial01"] == ["legal-trial00"]


def test_a_sweep_mixing_samplers_resumed_from_a_checkpoint_before_its_last_draws_ends_as_it_did(tiny_lm_dir, tmp_path):
    """What a kill after an early checkpoint leaves (its later checkpoints and sweep.json gone),
    resumed: the listed department and both studies take the same turns and draw the same trials."""
    data = write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    raw = mixed_departments(data, eval_data, tmp_path / "out", tiny_lm_dir)
    raw["fleet"]["keep_checkpoints"] = 0  # every one: the test resumes from an early one
    straight = sweep_spec_from_dict(raw, "sweep.yaml")
    run_sweep(straight, progress=False)
    trials = FleetDir(straight.fleet.output)
    expected, theirs = (tmp_path / "out/sweep.json").read_text(), trial_weights(trials)
    every_trial = [adapter.name for adapter in straight.fleet.adapters]
    # the last checkpoint with both studies' second trials still to draw (TPE proper: startup_trials is 1)
    for path in trials.checkpoint_files():
        if len(load_checkpoint(path)["spec"]) < len(every_trial) - 1:
            resumed_from = path
    for later in trials.checkpoint_files():
        if later > resumed_from:
            later.unlink()
    (tmp_path / "out/sweep.json").unlink()

    resumed = sweep_spec_from_dict(raw, "sweep.yaml")
    run_sweep(resumed, progress=False, resume=True)
    assert [adapter.name for adapter in resumed.fleet.adapters] == every_trial
    assert json.loads((tmp_path / "out/sweep.json").read_text()) == json.loads(expected)
    ours = trial_weights(trials)
    assert ours.keys() == theirs.keys()
    for name, tensors in theirs.items():
        for key, tensor in tensors.items():
            assert ours[name][key].equal(tensor), (name, key)


def trial_weights(trials: FleetDir) -> dict[str, dict]:
    return {d.name: load_file(d / "adapter_model.safetensors") for d in sorted(trials.adapters.iterdir())}


def test_planning_a_sweep_with_a_tpe_department_is_refused_naming_it(tiny_lm_dir, tmp_path):
    data = write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    eval_data = write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    spec = sweep_spec_from_dict(mixed_departments(data, eval_data, tmp_path / "out", tiny_lm_dir), "sweep.yaml")
    with pytest.raises(ConfigError, match=r"--plan: department 'legal' draws its trials with sampler: tpe"):
        plan_sweep(spec, tokens_per_s=10)
