"""The gateway in front of an upstream OpenAI-compatible engine (vLLM's place; here a lorafleet
server on 127.0.0.1 stands in for it, so the relay is tested for real)."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest

from lorafleet.serve.gateway.server import ServeOptions
from lorafleet.serve.gateway.tenants import load_tenants
from tests.serve.conftest import KEYS, running_server

MESSAGES = [{"role": "user", "content": "What is the invoice total?"}]


@pytest.fixture(scope="module")
def upstream_and_gateway(fleet_dir, keys_file, tmp_path_factory):
    gateway_dir = tmp_path_factory.mktemp("gateway")
    with running_server(ServeOptions(fleet_dir=fleet_dir)) as (upstream_url, _):
        options = ServeOptions(fleet_dir=gateway_dir, tenants=load_tenants(keys_file), upstream_url=upstream_url)
        with running_server(options) as (gateway_url, _):
            yield upstream_url, gateway_url, gateway_dir


def chat_client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_gateway_relays_replies_and_keeps_tenants_apart(upstream_and_gateway):
    upstream, gateway, _ = upstream_and_gateway
    direct = chat_client(upstream).chat.completions.create(
        model="finance", messages=MESSAGES, temperature=0, max_tokens=6
    )
    relayed = chat_client(gateway, KEYS["finance-team"]).chat.completions.create(
        model="finance", messages=MESSAGES, temperature=0, max_tokens=6
    )
    assert relayed.choices[0].message.content == direct.choices[0].message.content
    assert relayed.usage.completion_tokens == direct.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        chat_client(gateway, KEYS["finance-team"]).chat.completions.create(model="legal", messages=MESSAGES)
    listed = {m.id for m in chat_client(gateway, KEYS["ops"]).models.list()}
    assert {"finance", "legal", "base"} <= listed


def test_gateway_relays_streams_and_accounts_usage(upstream_and_gateway):
    _, gateway, gateway_dir = upstream_and_gateway
    client = chat_client(gateway, KEYS["legal-team"])
    with_usage = list(
        client.chat.completions.create(
            model="legal",
            messages=MESSAGES,
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    without = list(
        client.chat.completions.create(model="legal", messages=MESSAGES, temperature=0, max_tokens=5, stream=True)
    )
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(with_usage) == text(without)
    assert with_usage[-1].usage is not None and all(c.usage is None for c in without)
    assert all(c.model == "legal" for c in without)
    rows = (
        sqlite3.connect(gateway_dir / "lorafleet.sqlite")
        .execute("SELECT completion_tokens FROM requests WHERE tenant = 'legal-team' AND status = 200")
        .fetchall()
    )
    assert len(rows) >= 2 and all(tokens > 0 for (tokens,) in rows)


def test_gateway_relays_tool_calls_logprobs_structured_output_and_n(upstream_and_gateway):
    """What vLLM does itself (grammars, tool parsing, logprobs) passes through the gateway intact."""
    upstream, gateway, _ = upstream_and_gateway
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}}  # fmt: skip
    ask = {"model": "finance", "messages": MESSAGES, "max_tokens": 80, "tools": [weather], "temperature": 0,
           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    direct = chat_client(upstream).chat.completions.create(**ask)
    relayed = chat_client(gateway, KEYS["finance-team"]).chat.completions.create(**ask)
    streamed = chat_client(gateway, KEYS["finance-team"]).chat.completions.create(**ask, stream=True)
    deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    for reply in (direct, relayed):
        assert reply.choices[0].finish_reason == "tool_calls"
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert relayed.choices[0].message.tool_calls[0].function.arguments == "".join(d.function.arguments for d in deltas)
    scored = chat_client(gateway, KEYS["finance-team"]).chat.completions.create(
        model="finance", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, n=2
    )
    assert len(scored.choices) == 2 and len(scored.choices[1].logprobs.content) == scored.usage.completion_tokens // 2
    completion = chat_client(gateway, KEYS["finance-team"]).completions.create(
        model="finance", prompt="The invoice", max_tokens=3, temperature=0
    )
    assert (
        completion.choices[0].text
        == chat_client(upstream)
        .completions.create(model="finance", prompt="The invoice", max_tokens=3, temperature=0)
        .choices[0]
        .text
    )


def test_admin_unload_and_load_reach_the_upstream(upstream_and_gateway):
    upstream, gateway, _ = upstream_and_gateway
    admin = {"Authorization": f"Bearer {KEYS['ops']}"}
    assert httpx.delete(f"{gateway}/v1/adapters/legal", headers=admin, timeout=60).status_code == 200
    assert "legal" not in {m.id for m in chat_client(upstream).models.list()}
    with pytest.raises(openai.NotFoundError):
        chat_client(gateway, KEYS["ops"]).chat.completions.create(model="legal", messages=MESSAGES)
    loaded = httpx.post(
        f"{gateway}/v1/adapters",
        headers=admin,
        timeout=60,
        json={"name": "legal", "path": "adapters/legal"},  # a path on the upstream's disk
    )
    assert loaded.status_code == 200, loaded.text
    assert "legal" in {m.id for m in chat_client(upstream).models.list()}


def test_vllm_is_started_as_vllm_serve_with_runtime_loading_and_lora_slots(fleet_dir):
    from lorafleet.fleet_dir import fleet_adapters
    from lorafleet.serve.gateway.upstream import vllm_command

    adapters = fleet_adapters(fleet_dir)
    command, environment = vllm_command(
        ["vllm"], fleet_dir / "base", adapters, 8100, None, ["--gpu-memory-utilization=0.8"]
    )
    assert command[:3] == ["vllm", "serve", str(fleet_dir / "base")]
    assert "vllm.entrypoints.openai.api_server" not in command, "the deprecated entry point"
    assert environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    gpu, cpu = int(command[command.index("--max-loras") + 1]), int(command[command.index("--max-cpu-loras") + 1])
    assert gpu == len(adapters) and cpu >= len(adapters) + 8, "room for adapters loaded at runtime"
    assert command[command.index("--max-lora-rank") + 1] == "8"  # the fleet's ranks are 4 and 8
    assert {f"{name}={path}" for name, path in adapters.items()} <= set(command)
    assert command[-1] == "--gpu-memory-utilization=0.8", "the user's arguments come last, so they win"
    many = {f"a{i}": next(iter(adapters.values())) for i in range(20)}
    command, _ = vllm_command(["vllm"], fleet_dir / "base", many, 8100, None, [])
    assert command[command.index("--max-loras") + 1] == "8", "GPU slots, not the whole fleet"


def serve_command(*args: str):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_the_cli_serves_through_an_upstream_and_refuses_a_dead_one(fleet_dir, keys_file, tmp_path):
    import time

    from tests.serve.conftest import free_port

    dead = serve_command("--fleet", str(tmp_path), "--upstream", f"http://127.0.0.1:{free_port()}")
    _, errors = dead.communicate(timeout=120)
    assert dead.returncode == 2 and "cannot reach the upstream" in errors

    with running_server(ServeOptions(fleet_dir=fleet_dir)) as (upstream, _):
        port = free_port()
        gateway = serve_command("--fleet", str(tmp_path), "--upstream", upstream, "--port", str(port),
                                "--keys", str(keys_file))  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                assert gateway.poll() is None, gateway.stderr.read()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not come up"
                time.sleep(0.2)
            ask = dict(model="finance", messages=MESSAGES, temperature=0, max_tokens=6)
            relayed = chat_client(f"http://127.0.0.1:{port}", KEYS["finance-team"]).chat.completions.create(**ask)
            direct = chat_client(upstream).chat.completions.create(**ask)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    assert relayed.choices[0].message.content == direct.choices[0].message.content
