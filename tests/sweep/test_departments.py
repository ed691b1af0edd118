"""One sweep file searching several departments: all trials in one fleet, each department's trials
ranked only among themselves and crowned apart; and `--retrain-full`, which trains each winner's
configuration again on the training and held-out files together.

The sweep trains in float64, as tests/sweep/test_sweep.py's does, so a trial is held to its
configuration trained alone within the derived bounds of tests/tolerances.py."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.config import FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.lineage import read_lineage
from lorafleet.governance.registry import Registry
from lorafleet.report import write_report
from lorafleet.sweep.plan import format_sweep_plan, plan_sweep
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import load_sweep_spec, sweep_spec_from_dict
from lorafleet.train.trainer import train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset
from tests.sweep.test_sweep import metric_lines, plain_asha

BUDGET, MIN_STEPS, REDUCTION = 8, 2, 2  # rungs at steps 2 and 4
TRAIN_RECORDS, HELD_OUT_RECORDS = 24, 6


def two_departments(root: Path, output: Path, base: Path) -> dict:
    """finance searches large learning rates, legal tiny ones on the same data: pooled, legal's
    trials would lose every rung to finance's; ranked apart, each department keeps its best."""
    return {
        "base": str(base),
        "output": str(output),
        "adapter": {  # shared by both departments
            "data": str(root / "finance.jsonl"),
            "eval_data": str(root / "finance-test.jsonl"),
            "steps": BUDGET,
            "micro_batch_size": 2,
            "target_modules": ["q_proj", "v_proj"],
            "seed": 1,
            "warmup_steps": 1,
        },
        "sampler": "grid",
        "asha": {"min_steps": MIN_STEPS, "reduction_factor": REDUCTION},
        "departments": {
            "finance": {"space": {"learning_rate": {"choice": [2e-2, 5e-3, 1e-3]}}},
            "legal": {
                "adapter": {"seed": 2},
                "space": {"learning_rate": {"choice": [3e-5, 1e-5]}, "rank": {"choice": [2, 4]}},
            },
        },
        "fleet": {"max_concurrent": 3},
    }


@pytest.fixture(scope="module")
def sweep(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("departments")
    write_text_dataset(root / "finance.jsonl", TRAIN_RECORDS, seed=0)
    write_text_dataset(root / "finance-test.jsonl", HELD_OUT_RECORDS, seed=1)
    spec = sweep_spec_from_dict(two_departments(root, root / "out", tiny_lm_dir), "sweep.yaml")
    spec.fleet.dtype = "float64"  # for the exact comparisons; a sweep file cannot ask for it
    return spec, run_sweep(spec, progress=False, retrain_full=True)


def arrivals_at_rungs(output: str, trials: set[str]) -> list[tuple[int, str, int, float]]:
    return [
        (r["fleet_step"], r["adapter"], r["step"], r["eval_loss"])
        for r in metric_lines(output)
        if "eval_loss" in r and r["step"] < BUDGET and r["adapter"] in trials
    ]


def test_each_departments_rung_decisions_equal_a_plain_asha_over_its_own_trials(sweep):
    spec, results = sweep
    every_trial = set()
    for department, search in spec.departments.items():
        arrivals = arrivals_at_rungs(spec.fleet.output, set(search.trials))
        ours = [(d["trial"], d["step"], d["continues"]) for d in results[department].record["decisions"]]
        assert ours == plain_asha(arrivals, [2, 4], REDUCTION), department
        assert not all(continues for _, _, continues in ours), f"{department}: no trial stopped; nothing is checked"
        every_trial |= set(search.trials)
    pooled = plain_asha(arrivals_at_rungs(spec.fleet.output, every_trial), [2, 4], REDUCTION)
    decisions = [d for result in results.values() for d in result.record["decisions"]]
    ranked_apart = sorted((d["trial"], d["step"], d["continues"]) for d in decisions)
    assert sorted(pooled) != ranked_apart, "one ASHA over both departments decides the same; this test checks nothing"


def test_the_departments_trials_share_one_fleet_queued_in_turn(sweep):
    spec, _ = sweep
    assert [a.name for a in spec.fleet.adapters] == [
        "finance-trial00", "legal-trial00", "finance-trial01", "legal-trial01",
        "finance-trial02", "legal-trial02", "legal-trial03",
    ]  # fmt: skip
    steps_with_both = {
        r["fleet_step"] for r in metric_lines(spec.fleet.output) if r["adapter"].startswith("finance")
    } & {r["fleet_step"] for r in metric_lines(spec.fleet.output) if r["adapter"].startswith("legal")}
    assert 1 in steps_with_both  # one base pass carried trials of both departments
    legal = next(a for a in spec.fleet.adapters if a.name == "legal-trial00")
    assert (legal.seed, legal.micro_batch_size, legal.eval_every) == (2, 2, MIN_STEPS)  # its own over the shared


def test_each_department_gets_its_own_winner(sweep):
    spec, results = sweep
    assert list(results) == ["finance", "legal"]
    record = json.loads((spec.output / "sweep.json").read_text())
    assert [r["department"] for r in record["departments"]] == ["finance", "legal"]
    registry = Registry(spec.output)
    try:
        for department, result in results.items():
            finished = [t for t in result.trials if t.stopped_at is None]
            assert {t.name for t in result.trials} == set(spec.departments[department].trials)
            assert result.winner == min(finished, key=lambda t: t.final).name
            assert result.winner.startswith(f"{department}-trial")
            assert registry.find(department).sweep["winner"]["trial"] == result.winner
    finally:
        registry.close()


def test_a_trial_of_the_second_department_equals_its_configuration_trained_alone(sweep, tmp_path):
    """Legal's winner, which shared fleet steps with finance's trials (a stopped trial matching its
    lone run is tests/sweep/test_sweep.py's)."""
    spec, results = sweep
    trial = next(a for a in spec.fleet.adapters if a.name == results["legal"].winner)
    alone_spec = FleetSpec(
        base=spec.fleet.base,
        output=str(tmp_path / trial.name),
        adapters=[dataclasses.replace(trial)],
        dtype="float64",
        checkpoint_every=0,
    )
    alone = train_fleet(alone_spec, progress=False)
    weight_tolerance = tolerances.trained_weights(trial.learning_rate, BUDGET)
    reference = load_file(alone.adapters[trial.name] / "adapter_model.safetensors")
    theirs = metric_lines(alone_spec.output)
    loss_tolerance = tolerances.metric(
        weight_tolerance, sum(t.numel() for t in reference.values()), max(r["grad_norm"] for r in theirs)
    )
    mine = [r for r in metric_lines(spec.fleet.output) if r["adapter"] == trial.name]
    assert len(mine) == len(theirs) == BUDGET
    for a, b in zip(mine, theirs, strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "eval_loss"):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert abs(a[key] - b[key]) <= loss_tolerance * max(1.0, abs(b[key])), (a["step"], key)
    in_sweep = load_file(FleetDir(spec.fleet.output).adapter(trial.name) / "adapter_model.safetensors")
    tolerances.assert_same_weights({"w": in_sweep}, {"w": reference}, weight_tolerance)


def test_retrain_full_saves_the_winner_retrained_on_all_the_data_and_says_so(sweep):
    spec, results = sweep
    for department, result in results.items():
        trial_dir = FleetDir(spec.fleet.output).adapter(result.winner)
        retrained = load_file(result.adapter / "adapter_model.safetensors")
        trial = load_file(trial_dir / "adapter_model.safetensors")
        assert retrained.keys() == trial.keys()
        assert any(not torch.equal(retrained[name], trial[name]) for name in trial)
        assert read_lineage(trial_dir).name == result.winner  # the trial's weights stay where they were
        lineage = read_lineage(result.adapter)
        assert lineage.name == department
        assert lineage.sweep["winner"]["trial"] == result.winner
        assert lineage.sweep["retrained"]["trial"] == result.winner
        assert "not a held-out number" in lineage.sweep["retrained"]["held_out"]
        assert [d["records"] for d in lineage.sweep["retrained"]["data"]] == [TRAIN_RECORDS, HELD_OUT_RECORDS]
        assert [d.records for d in lineage.data] == [TRAIN_RECORDS + HELD_OUT_RECORDS]
        assert lineage.loss["optimizer_steps"] == BUDGET
        assert lineage.id != read_lineage(trial_dir).id
    written = json.loads((spec.output / "sweep.json").read_text())
    assert all(r["retrained"]["trial"] == results[r["department"]].winner for r in written["departments"])


def test_the_retrained_adapter_equals_the_winners_configuration_trained_alone_on_both_files(sweep, tmp_path):
    spec, results = sweep
    winning = next(a for a in spec.fleet.adapters if a.name == results["finance"].winner)
    joined = spec.output / "retrain/data/finance.jsonl"
    assert len(joined.read_text().splitlines()) == TRAIN_RECORDS + HELD_OUT_RECORDS
    retrain = dataclasses.replace(winning, name="finance", data=str(joined), eval_data=None, eval_every=None)
    alone_spec = FleetSpec(
        base=spec.fleet.base, output=str(tmp_path / "alone"), adapters=[retrain], dtype="float64", checkpoint_every=0
    )
    alone = train_fleet(alone_spec, progress=False)
    reference = load_file(alone.adapters["finance"] / "adapter_model.safetensors")
    crowned = load_file(results["finance"].adapter / "adapter_model.safetensors")
    tolerance = tolerances.trained_weights(winning.learning_rate, BUDGET)
    tolerances.assert_same_weights({"w": crowned}, {"w": reference}, tolerance)


def test_the_plan_counts_each_departments_halving_and_the_peak_over_all_trials(sweep):
    spec, _ = sweep
    plan = plan_sweep(spec, tokens_per_s=100)
    # finance: 3 trials of 8 steps, rungs at 2 and 4 keeping 1/2: 3 x 2 + 1 x 2 + 1 x 4;
    # legal: 4 trials: 4 x 2 + 2 x 2 + 1 x 4
    spends = {d.department: (d.trials, d.steps_worst, d.steps_expected) for d in plan.departments}
    assert spends == {"finance": (3, 24, 12), "legal": (4, 32, 16)}
    assert (plan.trials, plan.steps_worst, plan.steps_expected) == (7, 56, 28)
    assert plan.tokens_expected == sum(d.tokens_expected for d in plan.departments) > 0
    # the three heaviest of the one fleet (max_concurrent 3): finance's rank-16 trials over legal's 2 and 4
    assert plan.peak_trials == ["finance-trial00", "finance-trial01", "finance-trial02"]
    text = format_sweep_plan(plan, spec)
    assert "sweep of finance, legal: 7 trials in one fleet" in text
    assert "finance: 3 trials" in text and "legal: 4 trials" in text
    total = text.split("all 2 departments:\n", 1)[1]
    assert f"{plan.tokens_expected:,.0f} tokens, {plan.tokens_expected / 100:.0f} s" in total
    assert "     28 trial steps" in total and "     56 trial steps" in total


def test_the_report_has_a_section_per_department_with_its_own_trials(sweep):
    spec, results = sweep
    page = write_report(spec.output).read_text()
    parts = re.split(r"<h2>Sweep of (\w+)</h2>", page)[1:]
    sections = {department: text.split("<h2>")[0] for department, text in zip(parts[::2], parts[1::2], strict=True)}
    assert list(sections) == ["finance", "legal"]
    for department, section in sections.items():
        rows = re.findall(r"<tr><td>([\w-]+?)(?: \(winner\))?</td>", section)
        assert rows == list(spec.departments[department].trials), department
        assert f"<td>{results[department].winner} (winner)</td>" in section
        assert "retrained on the training and held-out files" in section and "not a held-out number" in section


def test_a_retrained_winners_model_card_names_its_own_departments_sweep_and_the_retraining(sweep):
    spec, results = sweep
    assert main(["docs", "legal", "--fleet", str(spec.output)]) == 0
    card = (results["legal"].adapter / "README.md").read_text()
    chosen = card.split("## How it was chosen", 1)[1].split("\n## ", 1)[0]
    assert "sweep of `legal`: 4 trials" in chosen and "finance-trial" not in chosen
    assert all(f"| `{trial}` |" in chosen for trial in spec.departments["legal"].trials)
    retrained = next(line for line in chosen.splitlines() if line.startswith("- retrained on all the data"))
    assert f"trial `{results['legal'].winner}`'s configuration trained again for {BUDGET} steps" in retrained
    assert f"{TRAIN_RECORDS} records" in retrained and f"{HELD_OUT_RECORDS} records" in retrained
    assert "not a held-out number" in retrained


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"legal": {"spce": {}}}, "sweep.yaml: departments: legal: unknown field 'spce'"),
        ({"legal": {}}, "sweep.yaml: departments: legal: missing required field 'space'"),
        (
            {"legal": {"space": {"rank": {"choice": [2]}}, "adapter": {"eval_data": None}}},
            "sweep.yaml: departments: legal: adapter: 'eval_data'",
        ),
        (
            {"legal": {"space": {"rank": {"choice": [2]}}, "adapter": {"micro_batch_size": 0}}},
            "sweep.yaml: departments: legal: adapters[0] (legal-trial00): micro_batch_size must be at least 1",
        ),
        (
            {"legal": {"space": {"rank": {"choice": [2]}}, "asha": {"min_steps": BUDGET}}},
            "sweep.yaml: departments: legal: asha: min_steps",
        ),
        ({"le gal": {"space": {"rank": {"choice": [2]}}}}, "sweep.yaml: departments: le gal: adapter name"),
    ],
)
def test_a_wrong_department_names_the_department_and_the_field(tmp_path, change, message):
    raw = two_departments(tmp_path, tmp_path / "out", tmp_path / "base")
    raw["departments"] = {"finance": raw["departments"]["finance"], **change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        sweep_spec_from_dict(raw, "sweep.yaml")


def test_a_sweep_names_one_department_or_several_not_both(tmp_path):
    raw = two_departments(tmp_path, tmp_path / "out", tmp_path / "base") | {"department": "finance"}
    with pytest.raises(ConfigError, match="give 'department' .* or 'departments'"):
        sweep_spec_from_dict(raw, "sweep.yaml")


README = Path(__file__).parents[2] / "README.md"


def test_readme_departments_example_is_a_valid_sweep_file(tmp_path):
    example = re.search(r"```yaml\n(# departments-sweep\.yaml.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "departments-sweep.yaml").write_text(example)
    spec = load_sweep_spec(tmp_path / "departments-sweep.yaml")
    assert list(spec.departments) == ["finance", "legal"]
    assert all(len(search.trials) == 12 for search in spec.departments.values())
    legal = next(a for a in spec.fleet.adapters if a.name.startswith("legal"))
    assert legal.data == str(tmp_path / "data/legal.jsonl") and legal.micro_batch_size == 4


def test_the_sweep_command_retrains_each_departments_winner(tiny_lm_dir, tmp_path, capsys):
    write_text_dataset(tmp_path / "train.jsonl", 8, seed=0)
    write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    raw = two_departments(Path("."), Path("out"), tiny_lm_dir)
    raw["adapter"] |= {"data": "train.jsonl", "eval_data": "eval.jsonl", "steps": 3}
    raw["asha"] = {"min_steps": 1}
    raw["departments"] = {
        "finance": {"space": {"learning_rate": {"choice": [2e-2]}}},
        "legal": {"space": {"learning_rate": {"choice": [1e-3]}}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--retrain-full"]) == 0
    printed, shown = capsys.readouterr()
    # one bar counting both departments' trials, with each department's best so far
    assert re.search(
        r"0 running, 0 queued, 0 stopped, 2 finished; finance: best eval_loss [\d.]+ "
        r"\(finance-trial00, step \d\); legal: best eval_loss [\d.]+ \(legal-trial00, step \d\)",
        shown,
    )
    assert "winner: finance-trial00" in printed and "winner: legal-trial00" in printed
    assert printed.count("(retrained on the training and held-out data)") == 2
    for department in ("finance", "legal"):
        assert read_lineage(tmp_path / "out/adapters" / department).sweep["retrained"]["steps"] == 3
