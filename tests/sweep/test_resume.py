"""A sweep killed with SIGKILL after a checkpoint and continued with --resume ends as the same
sweep run straight through: the same trials, rung decisions and winner, and the same weights
(both run as `lorafleet sweep` processes in float32: the same process layout, so bitwise equal).
A TPE sweep, too: the trials its study draws after the kill are those an uninterrupted sweep draws."""

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


def sweep_file(root: Path, base: Path, output: str) -> dict:
    return {
        "base": str(base),
        "output": output,
        "department": "finance",
        "adapter": {
            "data": "train.jsonl",
            "eval_data": "eval.jsonl",
            "steps": 12,
            "micro_batch_size": 2,
            "target_modules": ["q_proj", "v_proj"],
            "seed": 1,
        },
        "space": {"learning_rate": {"choice": [2e-2, 5e-3, 1e-3, 3e-4]}, "rank": {"choice": [2, 4]}},
        "sampler": "grid",
        "asha": {"min_steps": 2, "reduction_factor": 2},  # rungs at 2, 4, 8; a checkpoint every 2 fleet steps
        "fleet": {"max_concurrent": 3},
    }


def tpe_sweep_file(root: Path, base: Path, output: str) -> dict:
    """Six trials, two at a time, the first two drawn at random: the study draws four more as slots open."""
    tpe = {"sampler": "tpe", "trials": 6, "startup_trials": 2, "seed": 3}
    tpe["space"] = {"learning_rate": {"log_uniform": [3e-4, 3e-2]}, "rank": {"choice": [2, 4]}}
    fleet = {"max_concurrent": 2}
    return (
        sweep_file(root, base, output)
        | tpe
        | {"adapter": sweep_file(root, base, output)["adapter"] | {"steps": 8}, "fleet": fleet}
    )


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


def kill_after_a_checkpoint(process: subprocess.Popen, output: Path, at_least: int = 0) -> None:
    """SIGKILL once a checkpoint of fleet step `at_least` or later is on disk (while trials still train)."""
    deadline = time.monotonic() + 300
    trials = FleetDir(output / "trials")
    while not any(checkpoint_step(path) >= at_least for path in trials.checkpoint_files()):
        assert process.poll() is None, "the sweep ended before its first checkpoint: " + process.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "sweep.json").exists(), "the sweep finished before it was killed; this test checks nothing"


def same_sweep(killed: Path, straight: Path, keys: tuple[str, ...]) -> None:
    """The resumed sweep's record and every weight (the department's and each trial's) equal the uninterrupted one's."""
    (expected,) = json.loads((straight / "sweep.json").read_text())["departments"]
    (resumed,) = json.loads((killed / "sweep.json").read_text())["departments"]
    assert any(not d["continues"] for d in expected["decisions"]), "no trial stopped: the rungs are not tested"
    for key in keys:
        assert resumed[key] == expected[key], key
    ours, theirs = weights(killed), weights(straight)
    assert ours.keys() == theirs.keys()
    for name, tensors in theirs.items():
        for key, tensor in tensors.items():
            assert ours[name][key].equal(tensor), (name, key)


def weights(output: Path) -> dict[str, dict]:
    directories = [FleetDir(output).adapter("finance"), *sorted(FleetDir(output / "trials").adapters.iterdir())]
    return {d.name: load_file(d / "adapter_model.safetensors") for d in directories}


@pytest.fixture(scope="module")
def sweep_dir(tiny_lm_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_text_dataset(root / "train.jsonl", 24, seed=0)
    write_text_dataset(root / "eval.jsonl", 6, seed=1)
    for name in ("straight", "killed"):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(sweep_file(root, tiny_lm_dir, name)))
        (root / f"tpe-{name}.yaml").write_text(yaml.safe_dump(tpe_sweep_file(root, tiny_lm_dir, f"tpe-{name}")))
    return root


@pytest.mark.slow  # three lorafleet processes, each loading torch and the base: about 30 s on 2 cores
def test_a_killed_sweep_resumes_to_the_same_trials_decisions_winner_and_weights(sweep_dir, tiny_lm_dir, capsys):
    straight = lorafleet("sweep", "straight.yaml", "--no-progress", cwd=sweep_dir)
    finished(straight)
    killed = lorafleet("sweep", "killed.yaml", "--no-progress", cwd=sweep_dir)
    kill_after_a_checkpoint(killed, sweep_dir / "killed", at_least=6)  # after the rungs at steps 2 and 4
    last = checkpoint_step(FleetDir(sweep_dir / "killed/trials").checkpoint_files()[-1])
    lines = [json.loads(line) for line in FleetDir(sweep_dir / "killed/trials").metrics.read_text().splitlines()]
    kept = [r for r in lines if r["fleet_step"] <= last]  # what the resumed sweep replays its rungs from
    assert {r["step"] for r in kept if "eval_loss" in r} >= {2, 4} and any(r.get("stopped") for r in kept)
    refused_before_training(sweep_dir, tiny_lm_dir, capsys)
    printed = finished(lorafleet("sweep", "killed.yaml", "--resume", "--no-progress", cwd=sweep_dir))
    assert "winner: finance-trial" in printed

    same_sweep(sweep_dir / "killed", sweep_dir / "straight", ("trials", "decisions", "winner"))


def refused_before_training(sweep_dir: Path, base: Path, capsys) -> None:
    """The killed sweep's output: a plain rerun is told to resume, a changed sweep file may not."""
    killed = sweep_dir / "killed.yaml"
    assert main(["sweep", str(killed), "--no-progress"]) == 2
    assert "holds checkpoints of an earlier sweep; continue it with lorafleet sweep" in capsys.readouterr().err
    changed = sweep_dir / "changed.yaml"
    for change, what in [
        ({"asha": {"min_steps": 2, "reduction_factor": 3}}, "finance: asha differs"),
        ({"space": {"learning_rate": {"choice": [2e-2, 1e-3]}, "rank": {"choice": [2, 4]}}}, "finance: space differs"),
        ({"fleet": {"max_concurrent": 2}}, "fleet: max_concurrent differs"),
    ]:
        changed.write_text(yaml.safe_dump(sweep_file(sweep_dir, base, "killed") | change))
        assert main(["sweep", str(changed), "--resume", "--no-progress"]) == 2
        assert f"the sweep file changed since the sweep started ({what})" in capsys.readouterr().err
    # checkpoint settings decide nothing: a resumed sweep may change them (not run here)
    assert "checkpoint_every" not in json.loads((sweep_dir / "killed/trials/sweep-spec.json").read_text())["fleet"]


def test_resume_without_a_checkpoint_is_refused(sweep_dir, tiny_lm_dir, capsys):
    (sweep_dir / "fresh.yaml").write_text(yaml.safe_dump(sweep_file(sweep_dir, tiny_lm_dir, "never-started")))
    assert main(["sweep", str(sweep_dir / "fresh.yaml"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint of a sweep" in capsys.readouterr().err
    assert not (sweep_dir / "never-started").exists()


@pytest.mark.slow  # three lorafleet processes, each loading torch, optuna and the base: about 30 s on 2 cores
def test_a_killed_tpe_sweep_resumes_to_the_same_draws_decisions_winner_and_weights(sweep_dir):
    pytest.importorskip("optuna")
    finished(lorafleet("sweep", "tpe-straight.yaml", "--no-progress", cwd=sweep_dir))
    killed = lorafleet("sweep", "tpe-killed.yaml", "--no-progress", cwd=sweep_dir)
    kill_after_a_checkpoint(killed, sweep_dir / "tpe-killed", at_least=4)
    checkpointed = load_checkpoint(FleetDir(sweep_dir / "tpe-killed/trials").checkpoint_files()[-1])
    handed = {adapter["name"] for adapter in checkpointed["spec"]}  # the trials drawn before the checkpoint
    finished(lorafleet("sweep", "tpe-killed.yaml", "--resume", "--no-progress", cwd=sweep_dir))

    (expected,) = json.loads((sweep_dir / "tpe-straight/sweep.json").read_text())["departments"]
    informed_by = expected["tpe"]["informed_by"]
    drawn_after = [name for name in informed_by if name not in handed]
    # the kill fell where the study still had trials to draw, modelled on rungs it was told (TPE proper)
    assert any(len(informed_by[name]) >= 2 for name in drawn_after), (checkpointed["fleet_step"], informed_by)
    same_sweep(sweep_dir / "tpe-killed", sweep_dir / "tpe-straight", ("trials", "decisions", "winner", "tpe"))
