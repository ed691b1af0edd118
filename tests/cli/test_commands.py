"""The real `lorafleet` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from peft import PeftModel

from lorafleet.models.loading import load_base


def lorafleet(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_demo_trains_adapters_that_beat_the_base(tmp_path):
    out = tmp_path / "demo"
    run = lorafleet("demo", "--out", str(out), "--steps", "300", "--train-size", "256", "--no-progress")
    assert run.returncode == 0, run.stderr
    rows = [
        line.split() for line in run.stdout.splitlines() if line.startswith(("marketing", "facilities", "logistics"))
    ]
    assert len(rows) == 3
    for _name, base_accuracy, adapter_accuracy in rows:
        assert int(adapter_accuracy.rstrip("%")) >= int(base_accuracy.rstrip("%")) + 20, run.stdout
    # The layout later stages rely on.
    assert (out / "base" / "config.json").exists()
    for name, *_ in rows:
        assert (out / "data" / f"{name}.jsonl").exists()
        assert (out / "adapters" / name / "adapter_config.json").exists()
    # The loss curve goes down for every adapter.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name, *_ in rows:
        losses = [m["loss"] for m in metrics if m["adapter"] == name]
        assert len(losses) == 300
        assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20, (name, losses[:3], losses[-3:])
    # And the adapters are PEFT adapters.
    PeftModel.from_pretrained(load_base(out / "base").model, out / "adapters" / "marketing")


def test_train_reports_bad_spec_without_a_traceback(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        yaml.safe_dump({"base": "m", "output": "o", "adapters": [{"name": "a", "data": "d.jsonl", "lr": 0.1}]})
    )
    run = lorafleet("train", str(tmp_path / "fleet.yaml"))
    assert run.returncode == 2
    assert "unknown field 'lr'" in run.stderr and "Traceback" not in run.stderr


def test_train_reports_missing_model_directory(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        yaml.safe_dump({"base": "no-such-model", "output": "o", "adapters": [{"name": "a", "data": "d.jsonl"}]})
    )
    run = lorafleet("train", str(tmp_path / "fleet.yaml"))
    assert run.returncode == 2
    assert "no-such-model does not exist" in run.stderr and "Traceback" not in run.stderr


def test_help_shows_examples():
    run = lorafleet("--help")
    assert run.returncode == 0 and "lorafleet train fleet.yaml --resume" in run.stdout
