"""A sweep killed with SIGKILL after a checkpoint and continued with --resume ends as the same
sweep run straight through: the same trials, rung decisions and winners, and the same weights
(both run as `lorafleet sweep` processes in float32: the same process layout, so bitwise equal).
One sweep file holds both kinds of department, so one kill tests both ways a sweep resumes: a grid
department's rungs replayed from metrics.jsonl, and a TPE department whose study draws, after the
kill, the trials an uninterrupted sweep draws."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main
from lorafleet.fleet_dir import FleetDir, checkpoint_step
from lorafleet.train.checkpoint import load_checkpoint
from tests.conftest import write_text_dataset

DEPARTMENTS = ("finance", "legal")


def sweep_file(base: Path, output: str) -> dict:
    """finance lists eight trials (grid; rungs at 2, 4 and 8 of 12 steps), legal draws six (TPE, the
    first two at random; rungs at 2 and 4 of 8 steps), their trials taking four slots in turn. A
    checkpoint every 2 fleet steps; the one at fleet step 6 comes after finance's rungs at 2 and 4
    stopped trials, and before legal draws its last two trials, each modelled on three or more."""
    return {
        "base": str(base),
        "output": output,
        "adapter": {  # shared by both departments
            "data": "train.jsonl",
            "eval_data": "eval.jsonl",
            "steps": 12,
            "micro_batch_size": 2,
            "target_modules": ["q_proj", "v_proj"],
            "seed": 1,
        },
        "asha": {"min_steps": 2, "reduction_factor": 2},
        "departments": {
            "finance": {
                "sampler": "grid",
                "space": {"learning_rate": {"choice": [2e-2, 5e-3, 1e-3, 3e-4]}, "rank": {"choice": [2, 4]}},
            },
            "legal": {
                "adapter": {"steps": 8},
                "sampler": "tpe",
                "trials": 6,
                "startup_trials": 2,
                "seed": 3,
                "space": {"learning_rate": {"log_uniform": [3e-4, 3e-2]}, "rank": {"choice": [2, 4]}},
            },
        },
        "fleet": {"max_concurrent": 4},
    }


def lorafleet(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def kill_after_a_checkpoint(process: subprocess.Popen, output: Path, at_least: int) -> None:
    """SIGKILL once a checkpoint of fleet step `at_least` or later is on disk (while trials still train)."""
    deadline = time.monotonic() + 300
    trials = FleetDir(output / "trials")
    while not any(checkpoint_step(path) >= at_least for path in trials.checkpoint_files()):
        assert process.poll() is None, "the sweep ended before the checkpoint: " + process.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "sweep.json").exists(), "the sweep finished before it was killed; this test checks nothing"


def weights(output: Path) -> dict[str, dict]:
    adapters = [FleetDir(output).adapter(department) for department in DEPARTMENTS]
    directories = [*adapters, *sorted(FleetDir(output / "trials").adapters.iterdir())]
    return {d.name: load_file(d / "adapter_model.safetensors") for d in directories}


@pytest.fixture(scope="module")
def sweep_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_text_dataset(root / "train.jsonl", 24, seed=0)
    write_text_dataset(root / "eval.jsonl", 6, seed=1)
    for name in ("straight", "killed"):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(sweep_file(tiny_lm_dir, name)))
    return root


@pytest.mark.slow  # three lorafleet processes, each loading torch, optuna and the base: about 50 s on 2 cores
def test_a_killed_sweep_resumes_to_the_same_trials_draws_decisions_winners_and_weights(sweep_dir, tiny_lm_dir, capsys):
    pytest.importorskip("optuna")
    finished(lorafleet("sweep", "straight.yaml", "--no-progress", cwd=sweep_dir))
    killed = lorafleet("sweep", "killed.yaml", "--no-progress", cwd=sweep_dir)
    kill_after_a_checkpoint(killed, sweep_dir / "killed", at_least=6)
    trials = FleetDir(sweep_dir / "killed/trials")
    checkpointed = load_checkpoint(trials.checkpoint_files()[-1])
    handed = {adapter["name"] for adapter in checkpointed["spec"]}  # the trials drawn before the checkpoint
    lines = [json.loads(line) for line in trials.metrics.read_text().splitlines()]
    kept = [r for r in lines if r["fleet_step"] <= checkpointed["fleet_step"]]  # what the resume replays rungs from
    finance = [r for r in kept if r["adapter"].startswith("finance-")]
    assert {r["step"] for r in finance if "eval_loss" in r} >= {2, 4} and any(r.get("stopped") for r in finance)
    refused_before_training(sweep_dir, tiny_lm_dir, capsys)
    printed = finished(lorafleet("sweep", "killed.yaml", "--resume", "--no-progress", cwd=sweep_dir))
    assert "winner: finance-trial" in printed and "winner: legal-trial" in printed

    expected = json.loads((sweep_dir / "straight/sweep.json").read_text())["departments"]
    resumed = json.loads((sweep_dir / "killed/sweep.json").read_text())["departments"]
    assert [d["department"] for d in resumed] == [d["department"] for d in expected] == list(DEPARTMENTS)
    for ours, theirs in zip(resumed, expected, strict=True):
        assert any(not d["continues"] for d in theirs["decisions"]), "no trial stopped: the rungs are not tested"
        for key in ("trials", "decisions", "winner", "tpe"):
            assert ours.get(key) == theirs.get(key), (theirs["department"], key)
    informed_by = expected[1]["tpe"]["informed_by"]
    drawn_after = [name for name in informed_by if name not in handed]
    # the kill fell where the study still had trials to draw, modelled on rungs it was told (TPE proper)
    assert any(len(informed_by[name]) >= 2 for name in drawn_after), (checkpointed["fleet_step"], informed_by)
    ours, theirs = weights(sweep_dir / "killed"), weights(sweep_dir / "straight")
    assert ours.keys() == theirs.keys()
    for name, tensors in theirs.items():
        for key, tensor in tensors.items():
            assert ours[name][key].equal(tensor), (name, key)


def refused_before_training(sweep_dir: Path, base: Path, capsys) -> None:
    """The killed sweep's output: a plain rerun is told to resume, a changed sweep file may not."""
    killed = sweep_dir / "killed.yaml"
    assert main(["sweep", str(killed), "--no-progress"]) == 2
    assert "holds checkpoints of an earlier sweep; continue it with lorafleet sweep" in capsys.readouterr().err
    changed = sweep_dir / "changed.yaml"
    fewer_rates = {"learning_rate": {"choice": [2e-2, 1e-3]}, "rank": {"choice": [2, 4]}}
    for change, what in [
        (lambda raw: raw["asha"].update(reduction_factor=3), "finance: asha differs"),
        (lambda raw: raw["departments"]["finance"].update(space=fewer_rates), "finance: space differs"),
        (lambda raw: raw["fleet"].update(max_concurrent=2), "fleet: max_concurrent differs"),
    ]:
        raw = sweep_file(base, "killed")
        change(raw)
        changed.write_text(yaml.safe_dump(raw))
        assert main(["sweep", str(changed), "--resume", "--no-progress"]) == 2
        assert f"the sweep file changed since the sweep started ({what})" in capsys.readouterr().err
    # checkpoint settings decide nothing: a resumed sweep may change them (not run here)
    assert "checkpoint_every" not in json.loads((sweep_dir / "killed/trials/sweep-spec.json").read_text())["fleet"]


def test_resume_without_a_checkpoint_is_refused(sweep_dir, tiny_lm_dir, capsys):
    raw = sweep_file(tiny_lm_dir, "never-started")
    del raw["departments"]["legal"]  # the grid alone: refused without optuna installed, too
    (sweep_dir / "fresh.yaml").write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(sweep_dir / "fresh.yaml"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint of a sweep" in capsys.readouterr().err
    assert not (sweep_dir / "never-started").exists()
