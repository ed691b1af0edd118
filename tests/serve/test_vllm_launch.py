"""`--engine vllm` launches `vllm serve` from vLLM's own environment (vLLM pins other versions of
transformers than lorafleet, so the two cannot share one): the Python given with --vllm-python, or
a `vllm` executable on PATH. A stand-in speaks vLLM's command line and OpenAI endpoints and records
how it was started (tests/serve/vllm_standin.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.serve.gateway.server import FleetServer, ServeOptions
from tests.serve.conftest import KEYS, free_port, running_server
from tests.serve.test_upstream import MESSAGES, chat_client

STANDIN = Path(__file__).with_name("vllm_standin.py")


def shell_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexport VLLM_STANDIN_LAUNCHED_AS="$0"\n{body}\n')
    path.chmod(0o755)
    return path


def standin_vllm_environment(root: Path) -> Path:
    """An environment of its own whose python has a `vllm` package (the stand-in as its CLI module)
    and nothing of lorafleet's on its path; returns that python."""
    cli = root / "lib" / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for package in (cli, cli.parent, cli.parent.parent):
        (package / "__init__.py").write_text("")
    (cli / "main.py").write_text(STANDIN.read_text())
    return shell_script(root / "bin" / "python", f'export PYTHONPATH="{root / "lib"}"\nexec "{sys.executable}" "$@"')


def standin_vllm_executable(directory: Path) -> Path:
    return shell_script(directory / "vllm", f'exec "{sys.executable}" "{STANDIN}" "$@"')


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_vllm_executable_on_path_is_launched_with_the_fleet_and_answers_through_the_gateway(
    fleet_dir, tmp_path, monkeypatch
):
    vllm = standin_vllm_executable(tmp_path / "vllm-env" / "bin")
    monkeypatch.setenv("PATH", f"{vllm.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VLLM_STANDIN_RECORD", str(tmp_path / "launch.json"))
    port = free_port()
    options = ServeOptions(fleet_dir=fleet_dir, engine="vllm", vllm_port=port, vllm_args=["--max-model-len=2048"])
    with running_server(options) as (url, server):
        reply = chat_client(url).chat.completions.create(model="legal", messages=MESSAGES, max_tokens=4)
        assert sorted(server.adapters) == ["finance", "legal"]
        process = server.backend.process
    assert reply.choices[0].message.content == "legal answers", "the request reached the launched vLLM as 'legal'"
    assert process.returncode is not None, "the gateway stops the vLLM it started"
    launched = json.loads((tmp_path / "launch.json").read_text())
    argv = launched["argv"]
    assert launched["launched_as"] == str(vllm)
    assert argv[:2] == ["serve", str(fleet_dir / "base")] and "--enable-lora" in argv
    assert (option(argv, "--host"), option(argv, "--port"), option(argv, "--served-model-name")) == (
        "127.0.0.1", str(port), "base")  # fmt: skip
    modules = argv[argv.index("--lora-modules") + 1 : argv.index("--lora-modules") + 3]
    assert sorted(modules) == [f"{name}={fleet_dir / 'adapters' / name}" for name in ("finance", "legal")]
    assert argv[-1] == "--max-model-len=2048", "the user's --vllm-arg comes last"
    assert launched["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1",
                               "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip


@pytest.mark.slow
def test_lorafleet_serve_launches_vllm_with_the_python_of_its_own_environment(fleet_dir, keys_file, tmp_path):
    """The real command, as the README sets it up: --vllm-python wins over a vllm on PATH."""
    python = standin_vllm_environment(tmp_path / "vllm-env")
    decoy = standin_vllm_executable(tmp_path / "elsewhere")
    record = tmp_path / "launch.json"
    environment = dict(
        os.environ, VLLM_STANDIN_RECORD=str(record), PATH=f"{decoy.parent}{os.pathsep}{os.environ['PATH']}"
    )
    port, vllm_port = free_port(), free_port()
    argv = ["serve", "--fleet", str(fleet_dir), "--keys", str(keys_file), "--port", str(port), "--engine", "vllm",
            "--vllm-python", str(python), "--vllm-port", str(vllm_port)]  # fmt: skip
    gateway = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", *argv], env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert gateway.poll() is None, gateway.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lorafleet serve --engine vllm did not come up"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        reply = chat_client(url, KEYS["finance-team"]).chat.completions.create(model="finance", messages=MESSAGES)
        listed = {m.id for m in chat_client(url, KEYS["ops"]).models.list()}
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
    assert reply.choices[0].message.content == "finance answers" and {"base", "finance", "legal"} <= listed
    launched = json.loads(record.read_text())
    assert launched["launched_as"] == str(python)
    assert launched["argv"][:2] == ["serve", str(fleet_dir / "base")]
    assert option(launched["argv"], "--port") == str(vllm_port)


def test_without_vllm_anywhere_the_error_says_how_to_set_up_its_own_environment(fleet_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here")
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm executable
    with pytest.raises(LorafleetError) as refused:
        FleetServer(ServeOptions(fleet_dir=fleet_dir, engine="vllm"))
    assert "--vllm-python ~/vllm-env/bin/python" in str(refused.value) and "pip install vllm" in str(refused.value)


def test_a_vllm_python_that_is_not_a_program_is_named(fleet_dir, tmp_path):
    with pytest.raises(ConfigError, match=rf"--vllm-python {tmp_path / 'nope'} is not an executable file"):
        FleetServer(ServeOptions(fleet_dir=fleet_dir, engine="vllm", vllm_python=tmp_path / "nope"))
