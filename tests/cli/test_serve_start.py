"""`lorafleet serve` start-up mistakes a newcomer makes, reported at once by the real command,
before the base model is loaded, with what to do instead."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import yaml

from lorafleet.models.tiny import build_tiny_qwen2


def lorafleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_serve_given_the_fleet_yaml_says_it_takes_the_training_output_directory(tmp_path):
    spec = {"base": "models/base", "output": "runs/2026-11", "adapters": [{"name": "a", "data": "a.jsonl"}]}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec))
    run = lorafleet("serve", "--fleet", str(tmp_path / "fleet.yaml"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "is a file, not a directory" in run.stderr and "does not exist" not in run.stderr
    assert f"--fleet {tmp_path / 'runs' / '2026-11'}" in run.stderr, "names the fleet's own output directory"


@pytest.mark.slow
def test_serve_on_a_port_in_use_fails_before_loading_the_model(tmp_path):
    build_tiny_qwen2(tmp_path / "fleet" / "base")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = lorafleet("serve", "--fleet", str(tmp_path / "fleet"), "--port", str(port))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"127.0.0.1:{port} is already in use" in run.stderr and "--port" in run.stderr
    assert "serving" not in run.stderr, "nothing may claim to serve on a port it never got"
    assert not (tmp_path / "fleet" / "lorafleet.sqlite").exists(), "the server was never built"
