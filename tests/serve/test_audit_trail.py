"""The server writes every request and every administrative event to the fleet's audit log."""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx
import openai

from lorafleet.governance.audit import list_segments, verify_chain
from lorafleet.governance.lineage import weight_hashes, weights_id
from lorafleet.serve.gateway.audit_trail import content_sha256
from lorafleet.serve.gateway.server import ServeOptions
from lorafleet.serve.gateway.tenants import hash_key, load_tenants
from tests.serve.conftest import KEYS, running_server

MESSAGES = [{"role": "user", "content": "What is the invoice total?"}]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def entries(fleet) -> list[dict]:
    return [json.loads(line) for segment in list_segments(fleet / "audit") for line in segment.read_text().splitlines()]


def copy_fleet(fleet_dir, tmp_path):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleet_dir, fleet, ignore=shutil.ignore_patterns("lorafleet.sqlite*", "audit"))
    return fleet


def test_requests_and_admin_events_are_logged_with_hashes_not_content(fleet_dir, keys_file, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    with running_server(ServeOptions(fleet_dir=fleet, tenants=load_tenants(keys_file))) as (url, server):
        reply = client(url, KEYS["finance-team"]).chat.completions.create(
            model="finance", messages=MESSAGES, max_tokens=5, temperature=0
        )
        stream = client(url, KEYS["finance-team"]).chat.completions.create(
            model="finance", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        missing = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {KEYS['finance-team']}"},
            json={"model": "legal", "messages": MESSAGES},
        )
        admin = {"authorization": f"Bearer {KEYS['ops']}"}
        assert httpx.delete(f"{url}/v1/adapters/legal", headers=admin).status_code == 200
        loaded = httpx.post(f"{url}/v1/adapters", headers=admin, json={"name": "legal", "path": "adapters/legal"})
        assert loaded.status_code == 200 and missing.status_code == 404
        server.audit.flush()
        assert server.audit.failures == 0
    assert verify_chain(fleet).entries == 7
    start, first, second, refused, unload, load, stop = entries(fleet)
    ids = {name: weights_id(weight_hashes(fleet / "adapters" / name)) for name in ("finance", "legal")}
    assert start["event"] == "serve.start" and start["data"]["adapters"] == ids
    keys = start["data"]["keys"]
    assert keys["sha256"] == hashlib.sha256(keys_file.read_bytes()).hexdigest()
    assert keys["tenants"]["ops"] == {"key_id": hash_key(KEYS["ops"])[:16], "admin": True}

    request = first["data"]
    assert first["event"] == "serve.request" and request["request_id"] == reply.id
    assert (request["tenant"], request["key_id"]) == ("finance-team", hash_key(KEYS["finance-team"])[:16])
    assert (request["model"], request["adapter"], request["adapter_id"]) == ("finance", "finance", ids["finance"])
    assert (
        request["input_sha256"]
        == hashlib.sha256(json.dumps(MESSAGES, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    assert request["output_sha256"] == content_sha256([reply.choices[0].message.content])
    assert (request["prompt_tokens"], request["completion_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert request["status"] == 200 and request["latency_ms"] > 0 and request["started"] < first["time"]
    assert "content" not in request and "invoice" not in json.dumps(entries(fleet))
    assert second["data"]["output_sha256"] == content_sha256([streamed])
    assert (refused["data"]["status"], refused["data"]["adapter"], refused["data"]["output_sha256"]) == (
        404,
        None,
        None,
    )
    assert unload["event"] == "serve.adapter_unload" and unload["data"]["adapter_id"] == ids["legal"]
    assert load["event"] == "serve.adapter_load" and load["data"]["adapter_id"] == ids["legal"]
    assert load["data"]["tenant"] == "ops" and stop["event"] == "serve.stop"


def test_content_is_logged_only_when_asked(fleet_dir, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    with running_server(ServeOptions(fleet_dir=fleet, log_content=True)) as (url, server):
        reply = client(url, "none").chat.completions.create(model="legal", messages=MESSAGES, max_tokens=3)
        server.audit.flush()
    (request,) = [entry["data"] for entry in entries(fleet) if entry["event"] == "serve.request"]
    assert request["content"] == {"messages": MESSAGES, "reply": reply.choices[0].message.content}
    assert request["tenant"] is None and request["key_id"] is None


def test_a_failing_append_is_counted_and_serving_goes_on(fleet_dir, tmp_path, capsys):
    fleet = copy_fleet(fleet_dir, tmp_path)
    with running_server(ServeOptions(fleet_dir=fleet)) as (url, server):
        server.audit.flush()
        (segment,) = list_segments(fleet / "audit")
        with segment.open("a") as handle:
            handle.write('{"cut off')  # a torn last line: nothing can be chained to it
        reply = client(url, "none").chat.completions.create(model="base", messages=MESSAGES, max_tokens=2)
        server.audit.flush()
        metrics = httpx.get(f"{url}/metrics").text
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert server.audit.failures == 1 and "lorafleet_audit_append_failures 1.0" in metrics
    assert "audit log append failed (serve.request)" in capsys.readouterr().err


def test_a_model_name_utf8_cannot_hold_is_still_logged(fleet_dir, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    with running_server(ServeOptions(fleet_dir=fleet)) as (url, server):
        body = '{"model": "x\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}'
        refused = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        server.audit.flush()
        assert refused.status_code == 404 and server.audit.failures == 0
    (request,) = [entry["data"] for entry in entries(fleet) if entry["event"] == "serve.request"]
    assert request["model"] == "x?" and request["status"] == 404 and len(request["input_sha256"]) == 64
    assert verify_chain(fleet).entries == 3
