"""The real `lorafleet` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from peft import PeftModel

from lorafleet.models.loading import load_base


def lorafleet(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_reports_bad_spec_without_a_traceback(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        yaml.safe_dump({"base": "m", "output": "o", "adapters": [{"name": "a", "data": "d.jsonl", "lr": 0.1}]})
    )
    run = lorafleet("train", str(tmp_path / "fleet.yaml"))
    assert run.returncode == 2
    assert "unknown field 'lr'" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_serve_command_answers_the_openai_client(tmp_path):
    import time

    import httpx
    import openai

    from lorafleet.models.tiny import build_tiny_qwen2
    from tests.serve.conftest import free_port

    build_tiny_qwen2(tmp_path / "fleet" / "base")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", "serve", "--fleet", str(tmp_path / "fleet"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lorafleet serve did not come up"
            time.sleep(0.2)
        chat = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = chat.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "no --keys given" in server.stderr.read()


@pytest.mark.slow
def test_serve_refuses_a_public_address_without_keys(tmp_path):
    run = lorafleet("serve", "--fleet", str(tmp_path), "--host", "0.0.0.0")
    assert run.returncode == 2 and "without --keys" in run.stderr


def test_keys_new_prints_a_key_and_its_hash():
    from lorafleet.serve.gateway.tenants import hash_key

    run = lorafleet("keys", "new")
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines())
    key = lines["key"].split()[0]
    assert lines["key_sha256"].strip() == hash_key(key) and key.startswith("sk-lf-")


def test_version():
    from lorafleet import __version__

    run = lorafleet("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"lorafleet {__version__}"


def test_serve_limit_flags_reach_the_server_options(tmp_path):
    from lorafleet.cli import build_parser
    from lorafleet.cli.serve import serve_options
    from lorafleet.serve.gateway.protocol import RequestLimits

    parse = build_parser().parse_args
    defaults = serve_options(parse(["serve", "--fleet", str(tmp_path)]))
    assert defaults.limits == RequestLimits() and defaults.image_policy.fetch_timeout_s == 10.0
    assert (
        serve_options(parse(["serve", "--fleet", ".", "--image-fetch-seconds", "2.5"])).image_policy.fetch_timeout_s
        == 2.5
    )
    flags = ["--max-prompts", "3", "--max-choices", "5", "--max-stop", "2", "--max-stop-chars", "7", "--max-tools", "1",
             "--max-json-depth", "9"]  # fmt: skip
    limits = serve_options(parse(["serve", "--fleet", str(tmp_path), *flags])).limits
    assert limits == RequestLimits(3, 5, 2, 7, 1, 9)
    fairness = [
        "--max-tenant-rows",
        "5",
        "--max-tenant-requests",
        "6",
        "--max-tenant-waiting",
        "7",
        "--prepare-threads",
        "3",
    ]
    options = serve_options(parse(["serve", "--fleet", str(tmp_path), *fairness]))
    assert (options.max_tenant_rows, options.max_tenant_requests, options.max_tenant_waiting) == (5, 6, 7)
    assert options.prepare_threads == 3 and (defaults.max_tenant_rows, defaults.prepare_threads) == (None, 8)
    with pytest.raises(SystemExit):
        parse(["serve", "--fleet", str(tmp_path), "--max-stop", "0"])
