"""A sweep trains its trials as adapters of one fleet: each trial must be exactly its configuration
trained alone, and the rungs must decide as a plain ASHA over the same metrics would.

The sweep and the lone runs train in float64, so their weights and losses are held to the derived
bounds of tests/tolerances.py, as tests/train/test_equivalence.py holds the fleet to peft."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.config import FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir, fleet_adapters
from lorafleet.governance.audit import verify_chain
from lorafleet.governance.lineage import read_lineage
from lorafleet.governance.registry import Registry
from lorafleet.report import sweep_figure, write_report
from lorafleet.sweep.plan import format_sweep_plan, halving_steps, plan_sweep
from lorafleet.sweep.progress import Best, sweep_status
from lorafleet.sweep.run import run_sweep
from lorafleet.sweep.space import Rungs, load_sweep_spec, sweep_spec_from_dict
from lorafleet.train.trainer import train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset

BUDGET, MIN_STEPS, REDUCTION = 8, 2, 2  # rungs at steps 2 and 4


def sweep_file(data: Path, eval_data: Path, output: Path, base: Path) -> dict:
    return {
        "base": str(base),
        "output": str(output),
        "department": "finance",
        "adapter": {
            "data": str(data),
            "eval_data": str(eval_data),
            "steps": BUDGET,
            "micro_batch_size": 2,
            "target_modules": ["q_proj", "v_proj"],
            "seed": 1,
            "warmup_steps": 1,
        },
        # the largest rates first: the trials queued behind them do worse at the rungs, so some stop;
        # the first two reach the first rung in one step, the worse first: ranked together, it stops
        "space": {"learning_rate": {"choice": [2e-2, 5e-3, 1e-3]}, "rank": {"choice": [2, 4]}},
        "sampler": "grid",
        "seed": 3,
        "asha": {"min_steps": MIN_STEPS, "reduction_factor": REDUCTION},
        "fleet": {"max_concurrent": 2},
    }


@pytest.fixture(scope="module")
def sweep(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = write_text_dataset(root / "train.jsonl", 24, seed=0)
    eval_data = write_text_dataset(root / "eval.jsonl", 6, seed=1)
    spec = sweep_spec_from_dict(sweep_file(data, eval_data, root / "out", tiny_lm_dir), "sweep.yaml")
    spec.fleet.dtype = "float64"  # for the exact comparisons; a sweep file cannot ask for it
    return spec, run_sweep(spec, progress=False)["finance"]


def metric_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def plain_asha(arrivals: list[tuple[int, str, int, float]], rungs: list[int], reduction: int) -> list[tuple]:
    """Optuna's SuccessiveHalvingPruner, written out, with the trials that reach a rung in the same
    fleet step ranked together: each continues when its value is at most the (n // reduction)-th
    best of the n values seen at the rung so far (the best, while n < reduction)."""
    seen: dict[int, list[float]] = {rung: [] for rung in rungs}
    decisions = []
    for fleet_step in sorted({arrival[0] for arrival in arrivals}):
        now = [(trial, step, value) for at, trial, step, value in arrivals if at == fleet_step and step in seen]
        for _, step, value in now:
            seen[step].append(value)
        for trial, step, value in now:
            ranked = sorted(seen[step])
            decisions.append((trial, step, value <= ranked[max(len(ranked) // reduction - 1, 0)]))
    return decisions


def test_rung_decisions_equal_a_plain_asha_over_the_same_metrics(sweep):
    spec, result = sweep
    lines = metric_lines(spec.fleet.output)
    arrivals = [
        (r["fleet_step"], r["adapter"], r["step"], r["eval_loss"])
        for r in lines
        if "eval_loss" in r and r["step"] < BUDGET
    ]
    expected = plain_asha(arrivals, [2, 4], REDUCTION)
    ours = [(d["trial"], d["step"], d["continues"]) for d in result.record["decisions"]]
    assert ours == expected
    assert ("finance-trial00", 2, False) in ours  # ranked with trial01, which reached the rung in the same step
    stopped = {trial for trial, _, continues in expected if not continues}
    assert stopped, "the sweep should stop some trial, or this test checks nothing"
    # a stopped trial keeps its metrics and trains no further
    for trial in result.trials:
        assert (trial.stopped_at is not None) == (trial.name in stopped)
        assert trial.steps == (trial.stopped_at or BUDGET)
        assert trial.curve[-1][0] == trial.steps
    # its slot goes to the next queued trial in the same fleet step: that one trains from the next
    starts = {}
    for r in lines:
        starts.setdefault(r["adapter"], r["fleet_step"])
    handed_over = [r["fleet_step"] for r in lines if r.get("stopped") and max(starts.values()) > r["fleet_step"]]
    assert handed_over, "no trial was queued when one stopped, or this test checks nothing"
    for fleet_step in handed_over:
        assert fleet_step + 1 in starts.values()


def test_a_trial_in_the_sweep_equals_its_configuration_trained_alone(sweep, tmp_path):
    spec, result = sweep
    by_name = {a.name: a for a in spec.fleet.adapters}
    stopped = next(t for t in result.trials if t.stopped_at is not None)
    for trial_name in (result.winner, stopped.name):
        trial = by_name[trial_name]
        alone_spec = FleetSpec(
            base=spec.fleet.base,
            output=str(tmp_path / trial_name),
            adapters=[dataclasses.replace(trial)],
            dtype="float64",
            checkpoint_every=0,
        )
        alone = train_fleet(alone_spec, progress=False)
        weight_tolerance = tolerances.trained_weights(trial.learning_rate, BUDGET)
        ours = metric_lines(spec.fleet.output)
        theirs = metric_lines(alone_spec.output)
        mine = [r for r in ours if r["adapter"] == trial_name]
        parameters = sum(
            t.numel() for t in load_file(alone.adapters[trial_name] / "adapter_model.safetensors").values()
        )
        loss_tolerance = tolerances.metric(weight_tolerance, parameters, max(r["grad_norm"] for r in theirs))
        for a, b in zip(mine, theirs, strict=False):  # the stopped trial's lines are a prefix of the lone run's
            assert a["step"] == b["step"]
            for key in ("loss", "eval_loss"):
                assert (key in a) == (key in b), (trial_name, a["step"], key)
                if key in a:
                    assert abs(a[key] - b[key]) <= loss_tolerance * max(1.0, abs(b[key])), (trial_name, a["step"], key)
        if trial_name == result.winner:
            assert len(mine) == len(theirs) == BUDGET
            reference = load_file(alone.adapters[trial_name] / "adapter_model.safetensors")
            crowned = load_file(result.adapter / "adapter_model.safetensors")
            tolerances.assert_same_weights({"w": crowned}, {"w": reference}, weight_tolerance)


def test_the_winner_is_the_best_full_budget_trial_and_its_lineage_records_the_sweep(sweep):
    spec, result = sweep
    finished = [t for t in result.trials if t.stopped_at is None]
    assert result.winner == min(finished, key=lambda t: t.final).name
    lineage = read_lineage(result.adapter)
    assert lineage.name == "finance"
    assert lineage.sweep["winner"]["trial"] == result.winner
    assert lineage.sweep["space"] == {"learning_rate": {"choice": [2e-2, 5e-3, 1e-3]}, "rank": {"choice": [2, 4]}}
    assert {t["name"]: t["final"] for t in lineage.sweep["trials"]} == {t.name: t.final for t in result.trials}
    assert "lowest final eval_loss" in lineage.sweep["winner"]["why"]
    registry = Registry(spec.output)
    try:
        assert registry.find("finance").sweep["winner"]["trial"] == result.winner
    finally:
        registry.close()


def test_the_output_fleet_holds_the_winner_alone_and_the_trials_a_fleet_of_their_own(sweep):
    """`lorafleet serve --fleet <output>` lists adapters as fleet_adapters does: the winner only;
    the trials keep their adapters, metrics, registry and audit log in `<output>/trials/`."""
    spec, result = sweep
    output = spec.output
    assert fleet_adapters(output) == {"finance": output / "adapters/finance"}
    trials = fleet_adapters(output / "trials")
    assert set(trials) == {t.name for t in result.trials}
    assert result.record["winner"]["trial_directory"] == f"trials/adapters/{result.winner}"
    assert read_lineage(result.adapter).sweep["winner"]["trial_directory"] == f"trials/adapters/{result.winner}"
    crowned, trial = (load_file(d / "adapter_model.safetensors") for d in (result.adapter, trials[result.winner]))
    assert crowned.keys() == trial.keys() and all(crowned[k].equal(trial[k]) for k in trial)
    assert verify_chain(FleetDir(output).audit).entries == 1  # sweep.winner; the trials' training is theirs
    assert verify_chain(FleetDir(output / "trials").audit).entries > len(trials)


def test_samplers_are_seeded_and_the_grid_takes_every_combination(tmp_path):
    raw = sweep_file(tmp_path / "d.jsonl", tmp_path / "e.jsonl", tmp_path / "out", tmp_path / "base")
    raw |= {
        "sampler": "random",
        "trials": 5,
        "space": {"learning_rate": {"log_uniform": [1e-4, 3e-2]}, "rank": {"choice": [2, 4]}},
    }
    first, again = (sweep_spec_from_dict(raw, "sweep.yaml").departments["finance"].trials for _ in range(2))
    assert first == again and len(first) == 5
    assert all(1e-4 <= v["learning_rate"] <= 3e-2 and v["rank"] in (2, 4) for v in first.values())
    assert len({v["learning_rate"] for v in first.values()}) == 5
    grid = raw | {
        "sampler": "grid",
        "trials": None,
        "space": {"rank": {"choice": [2, 4]}, "alpha": {"choice": [4, 8, 16]}},
    }
    trials = sweep_spec_from_dict(grid, "sweep.yaml").departments["finance"].trials
    assert sorted((v["rank"], v["alpha"]) for v in trials.values()) == [(r, a) for r in (2, 4) for a in (4, 8, 16)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {"learning_rat": {"choice": [1e-3]}}}, "'learning_rat' is not a searchable adapter field"),
        ({"space": {"learning_rate": {"log_uniform": [1e-4, 1e-2]}}}, "the grid sampler takes choice dimensions only"),
        ({"asha": {"min_steps": BUDGET}}, "min_steps must be a whole number from 1 to below the budget"),
        ({"space": {"rank": [2, 4]}}, "rank must be one of {choice: [...]}"),
    ],
)
def test_a_wrong_sweep_file_names_the_field_and_the_fix(tmp_path, change, message):
    raw = sweep_file(tmp_path / "d.jsonl", tmp_path / "e.jsonl", tmp_path / "out", tmp_path / "base") | change
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{").replace("(", r"\(")):
        sweep_spec_from_dict(raw, "sweep.yaml")


README = Path(__file__).parents[2] / "README.md"


def test_readme_sweep_example_is_a_valid_sweep_file(tmp_path):
    example = re.search(r"```yaml\n(# sweep\.yaml.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "sweep.yaml").write_text(example)
    spec = load_sweep_spec(tmp_path / "sweep.yaml")
    finance = spec.departments["finance"]
    assert len(finance.trials) == 16 and finance.rungs.steps() == [10, 30, 90]
    assert spec.fleet.adapters[0].name == "finance-trial00"
    assert spec.fleet.adapters[0].eval_data == str(tmp_path / "data/finance-test.jsonl")
    assert spec.fleet.max_concurrent == 8


@pytest.mark.parametrize("shown", [False, True])
def test_the_sweep_command_saves_the_winner_and_prints_why(tiny_lm_dir, tmp_path, capsys, shown):
    write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    raw = sweep_file(Path("train.jsonl"), Path("eval.jsonl"), Path("out"), tiny_lm_dir)
    raw["adapter"]["steps"] = 4
    raw["space"] = {"learning_rate": {"choice": [2e-2, 1e-3]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), *([] if shown else ["--no-progress"])]) == 0
    printed, shown_text = capsys.readouterr()
    # the two start together and meet at the rung (step 2) in one step: one stops, one finishes
    assert ("0 running, 0 queued, 1 stopped, 1 finished; best eval_loss" in shown_text) == shown
    assert "finance-trial00:" not in shown_text  # one bar for the sweep, none per trial
    assert "winner: finance-trial" in printed and "why: lowest final eval_loss" in printed
    assert (tmp_path / "out/adapters/finance/adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "out/sweep.json").read_text())["departments"][0]["department"] == "finance"
    assert "<h2>Sweep of finance</h2>" in (tmp_path / "out/report.html").read_text()


def test_a_sweep_under_torchrun_is_refused_before_it_trains(tmp_path, monkeypatch):
    raw = sweep_file(tmp_path / "d.jsonl", tmp_path / "e.jsonl", tmp_path / "out", tmp_path / "base")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs on one process"):
        run_sweep(sweep_spec_from_dict(raw, "sweep.yaml"), progress=False)
    assert not (tmp_path / "out").exists()


def test_the_winners_model_card_names_the_sweep_and_why_the_winner_won(sweep, capsys):
    spec, result = sweep
    assert main(["docs", "finance", "--fleet", str(spec.output)]) == 0
    card = (result.adapter / "README.md").read_text()
    chosen = card.split("## How it was chosen", 1)[1].split("\n## ", 1)[0]
    assert "6 trials (grid sampler, seed 3)" in chosen and "held-out `eval_loss`" in chosen
    assert "learning_rate choice [0.02, 0.005, 0.001], rank choice [2, 4]" in chosen
    assert f"winner: trial `{result.winner}`" in chosen and result.record["winner"]["why"] in chosen
    for trial in result.trials:
        row = next(line for line in chosen.splitlines() if line.startswith(f"| `{trial.name}` |"))
        outcome = "won" if trial.name == result.winner else (
            f"stopped at step {trial.stopped_at}" if trial.stopped_at else "full budget"
        )  # fmt: skip
        assert row.endswith(f"| {trial.final:.6g} | {trial.steps} | {outcome} |"), row


def test_the_report_draws_every_trials_curve_and_marks_each_rung_decision(sweep):
    spec, result = sweep
    page = write_report(spec.output).read_text()
    assert "<h2>Sweep of finance</h2>" in page and "held-out curve of every trial with its rung decisions" in page
    rows = dict(re.findall(r"<tr><td>(finance-trial\d\d)(?: \(winner\))?</td>(.*?)</tr>", page))
    assert sorted(rows) == sorted(t.name for t in result.trials)
    assert f"<td>{result.winner} (winner)</td>" in page
    for decision in result.record["decisions"]:
        mark = f"step {decision['step']}: {'continued' if decision['continues'] else 'stopped'}"
        assert mark in rows[decision["trial"]], (decision, rows[decision["trial"]])
    # the drawing: one curve per trial, and each decision a mark at its (step, value)
    axes = sweep_figure(result.record).axes[0]
    assert {line.get_label() for line in axes.get_lines()} >= {t.name for t in result.trials}
    marks = {c.get_label(): sorted(map(tuple, c.get_offsets().tolist())) for c in axes.collections}
    for outcome in ("continued", "stopped"):
        expected = [
            (d["step"], d["value"]) for d in result.record["decisions"] if d["continues"] == (outcome == "continued")
        ]
        assert marks.get(outcome, []) == sorted(expected), outcome


def test_the_plan_predicts_the_steps_with_and_without_halving_and_the_peak_of_the_largest_ranks(sweep, capsys):
    spec, result = sweep
    plan = plan_sweep(spec, rate_from=Path(spec.fleet.output))
    # 6 trials of 8 steps, rungs at 2 and 4 keeping 1/2: 6 x 2 + 3 x (4 - 2) + 1 x (8 - 4)
    assert (plan.steps_worst, plan.steps_expected) == (48, 22)
    assert halving_steps(16, Rungs(10, 3, 100)) == 16 * 10 + 5 * 20 + 1 * 70
    assert plan.peak_trials == ["finance-trial01", "finance-trial03"]  # rank 4, two at once (max_concurrent)
    (finance,) = plan.departments
    assert plan.tokens_expected == 22 * finance.tokens_per_step and finance.tokens_per_step > 0
    lines = metric_lines(spec.fleet.output)
    last = {r["adapter"]: r["tokens"] for r in lines}
    assert plan.tokens_per_s == sum(last.values()) / lines[-1]["elapsed_s"]
    assert "measured" in plan.rate_source and "metrics.jsonl" in plan.rate_source
    text = format_sweep_plan(plan, spec)
    assert "finance-trial01, finance-trial03" in text and "22 trial steps" in text and "48 trial steps" in text


def test_sweep_plan_prints_the_time_at_a_given_rate_and_trains_nothing(tiny_lm_dir, tmp_path, capsys):
    write_text_dataset(tmp_path / "train.jsonl", 12, seed=0)
    write_text_dataset(tmp_path / "eval.jsonl", 4, seed=1)
    raw = sweep_file(Path("train.jsonl"), Path("eval.jsonl"), Path("out"), tiny_lm_dir)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--plan", "--tokens-per-s", "10"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    plan = plan_sweep(load_sweep_spec(tmp_path / "sweep.yaml"), tokens_per_s=10)
    assert f"{plan.tokens_expected:,.0f} tokens, {plan.tokens_expected / 10 / 60:.1f} min" in printed
    assert "at 10.0 tokens/s, given (--tokens-per-s)" in printed
    # a plan's option without --plan is refused before anything trains
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--tokens-per-s", "10"]) != 0
    assert "--tokens-per-s is an option of --plan" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a plan counts a sweep from its start: with --resume it is refused, and nothing trains
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--plan", "--resume"]) != 0
    assert "--plan predicts a sweep before it starts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_sweep_status_counts_trials_and_names_the_best_so_far():
    none_yet = {"finance": ("eval_loss", None)}
    assert sweep_status(2, 10, 3, 1, none_yet) == "2 running, 10 queued, 3 stopped, 1 finished; no eval_loss yet"
    best = Best(1.234567, "finance-trial03", 30)
    assert (
        sweep_status(8, 0, 7, 1, {"finance": ("eval_loss", best)})
        == "8 running, 0 queued, 7 stopped, 1 finished; best eval_loss 1.2346 (finance-trial03, step 30)"
    )
    # several departments: each one's best, named, since their trials are compared apart
    assert (
        sweep_status(3, 0, 0, 0, {"finance": ("eval_loss", best), "legal": ("eval_loss", None)})
        == "3 running, 0 queued, 0 stopped, 0 finished; "
        "finance: best eval_loss 1.2346 (finance-trial03, step 30); legal: no eval_loss yet"
    )
