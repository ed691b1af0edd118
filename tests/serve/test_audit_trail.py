"""The server writes every request and every administrative event to the fleet's audit log."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time

import httpx
import openai
import pytest
import yaml

from lorafleet.cli import main
from lorafleet.data.pii import PiiDetector
from lorafleet.errors import AuditError
from lorafleet.governance.audit import list_segments, verify_chain
from lorafleet.governance.lineage import weight_hashes, weights_id
from lorafleet.governance.registry import DATABASE
from lorafleet.governance.retention import set_retention
from lorafleet.governance.signing import generate_key
from lorafleet.serve.gateway.audit_trail import content_sha256, redact_content
from lorafleet.serve.gateway.request_log import RequestLog, RequestRecord
from lorafleet.serve.gateway.run import reload_keys_now
from lorafleet.serve.gateway.server import FleetServer, ServeOptions
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


def test_content_is_logged_only_when_asked_and_then_with_personal_data_replaced(fleet_dir, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    sent = "Invoice for jane.doe@example.com, call +44 20 7946 0958 or jane.doe@example.com"
    personal = [{"role": "user", "content": sent}]
    with running_server(ServeOptions(fleet_dir=fleet, log_content=True)) as (url, server):
        reply = client(url, "none").chat.completions.create(model="legal", messages=personal, max_tokens=3)
        server.audit.flush()
    (request,) = [entry["data"] for entry in entries(fleet) if entry["event"] == "serve.request"]
    text = "Invoice for <EMAIL_1>, call <PHONE_1> or <EMAIL_1>"
    assert request["content"]["messages"] == [{"role": "user", "content": text}]
    assert request["content"]["redacted"] == {"EMAIL": 2, "PHONE": 1}
    assert "reply" in request["content"] and reply.choices[0].message.content is not None
    assert request["input_sha256"] == content_sha256(personal)  # the hash is of what was sent
    assert request["tenant"] is None and request["key_id"] is None
    with sqlite3.connect(fleet / DATABASE) as db:  # one copy, redacted: none in the request log
        assert db.execute("SELECT content FROM requests").fetchall() == [(None,)]
    assert b"jane.doe" not in b"".join(path.read_bytes() for path in fleet.glob("lorafleet.sqlite*"))


def test_a_text_completions_prompts_and_reply_are_redacted_with_shared_placeholders():
    content = {"prompt": ["Write to ann@example.org", "Ask ann@example.org"], "reply": "ann@example.org, bob@x.io"}
    redacted = redact_content(content, PiiDetector())
    assert redacted["prompt"] == ["Write to <EMAIL_1>", "Ask <EMAIL_1>"]
    assert redacted["reply"] == "<EMAIL_1>, <EMAIL_2>" and redacted["redacted"] == {"EMAIL": 4}


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


def test_a_reloaded_keys_file_takes_effect_and_both_outcomes_are_audited(fleet_dir, keys_file, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_file.read_text())
    admin = {"authorization": f"Bearer {KEYS['ops']}"}
    with running_server(ServeOptions(fleet_dir=fleet, tenants=load_tenants(keys))) as (url, server):
        new_key = "sk-audit-new"
        tenants = yaml.safe_load(keys.read_text())["tenants"]
        tenants.append({"name": "auditors", "key_sha256": hash_key(new_key), "adapters": ["legal"]})
        keys.write_text(yaml.safe_dump({"tenants": tenants}))
        with pytest.raises(openai.AuthenticationError):
            client(url, new_key).models.list()
        reloaded = httpx.post(f"{url}/v1/keys/reload", headers=admin)
        assert reloaded.status_code == 200 and "auditors" in reloaded.json()["tenants"]
        assert [m.id for m in client(url, new_key).models.list()][-1] == "legal"
        refused = httpx.post(f"{url}/v1/keys/reload", headers={"authorization": f"Bearer {new_key}"})
        keys.write_text("tenants: []\n")  # broken: the keys in force stay
        broken = httpx.post(f"{url}/v1/keys/reload", headers=admin)
        assert (refused.status_code, broken.status_code) == (403, 400)
        messages: list[str] = []
        reload_keys_now(server, messages.append)  # what SIGHUP runs
        assert messages[0].startswith("lorafleet: keys NOT reloaded, the previous keys stay in force")
        assert [m.id for m in client(url, new_key).models.list()][-1] == "legal"
        server.audit.flush()
    events = {entry["event"]: entry["data"] for entry in entries(fleet)}  # the last of each kind
    assert events["serve.keys_reload_failed"]["signal"] == "SIGHUP"
    done, failed = events["serve.keys_reloaded"], events["serve.keys_reload_failed"]
    assert done["previous_sha256"] == hashlib.sha256(keys_file.read_bytes()).hexdigest() != done["sha256"]
    assert done["tenants"]["auditors"]["key_id"] == hash_key(new_key)[:16] and done["tenant"] == "ops"
    assert failed["kept_sha256"] == done["sha256"] and "tenants" in failed["error"] and failed["key_id"] is None
    assert verify_chain(fleet).entries > 0


@pytest.mark.slow  # starts `lorafleet serve` in its own process
def test_sighup_reloads_the_keys_of_a_running_lorafleet_serve_and_stop_is_logged(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from lorafleet.models.tiny import build_tiny_qwen2
    from tests.serve.conftest import free_port

    build_tiny_qwen2(tmp_path / "fleet" / "base")
    keys = tmp_path / "keys.yaml"
    tenant = {"name": "ops", "key_sha256": hash_key("sk-ops"), "adapters": "*", "admin": True}
    keys.write_text(yaml.safe_dump({"tenants": [tenant]}))
    port = free_port()
    argv = ["serve", "--fleet", str(tmp_path / "fleet"), "--keys", str(keys), "--port", str(port)]
    server = subprocess.Popen([sys.executable, "-m", "lorafleet.cli", *argv], stderr=subprocess.PIPE, text=True)

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert server.poll() is None and time.monotonic() < deadline, "lorafleet serve did not get there"
            time.sleep(0.2)

    def logged(event: str) -> bool:
        return (tmp_path / "fleet" / "audit").exists() and any(e["event"] == event for e in entries(tmp_path / "fleet"))

    try:
        wait_for(lambda: logged("serve.start"))
        keys.write_text(yaml.safe_dump({"tenants": [tenant, tenant | {"name": "new", "key_sha256": hash_key("k2")}]}))
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("serve.keys_reloaded"))
        keys.write_bytes(b"tenants:\n  - name: \xff\n")  # not UTF-8: this used to stop the server
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("serve.keys_reload_failed"))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert health.status_code == 200
    assert "keys reloaded: 2 tenants" in server.stderr.read()
    events = [entry["event"] for entry in entries(tmp_path / "fleet")]
    assert events == ["serve.start", "serve.keys_reloaded", "serve.keys_reload_failed", "serve.stop"]
    assert verify_chain(tmp_path / "fleet").entries == 4


def test_the_server_signs_checkpoints_at_start_on_a_period_and_at_shutdown(fleet_dir, tmp_path, capsys):
    fleet = copy_fleet(fleet_dir, tmp_path)
    public = generate_key(tmp_path / "audit.key")
    options = ServeOptions(fleet_dir=fleet, audit_key=tmp_path / "audit.key", audit_sign_every_s=0.5)
    with running_server(options) as (url, server):
        server.audit.flush()
        assert server.audit.signed == 1  # the start, signed as soon as it is written
        client(url, "none").chat.completions.create(model="base", messages=MESSAGES, max_tokens=2)
        deadline = time.monotonic() + 30
        while server.audit.signed < 2:  # the request, signed within the period with no further traffic
            assert time.monotonic() < deadline, "no checkpoint after the period"
            time.sleep(0.05)
    events = [entry["event"] for entry in entries(fleet)]
    assert events == [
        "serve.start",
        "audit.checkpoint",
        "serve.request",
        "audit.checkpoint",
        "serve.stop",
        "audit.checkpoint",
    ]
    assert main(["audit", "verify", str(fleet), "--public-key", str(public)]) == 0
    assert "signed checkpoints: 3 verified" in capsys.readouterr().out
    assert entries(fleet)[0]["data"]["audit_signed_every_s"] == 0.5


def test_a_server_given_a_key_that_is_not_a_private_key_refuses_to_start(fleet_dir, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    public = generate_key(tmp_path / "audit.key")
    with pytest.raises(AuditError, match="is not a PEM key|not an Ed25519 private key"):
        FleetServer(ServeOptions(fleet_dir=fleet, audit_key=public))


def test_the_servers_retention_covers_the_request_log_and_its_content(fleet_dir, tmp_path):
    fleet = copy_fleet(fleet_dir, tmp_path)
    set_retention(fleet, 200, via="lorafleet train")
    requests = RequestLog(fleet / DATABASE)
    for request_id in ("old", "new"):
        requests.record(RequestRecord(request_id, "t", "base", 1, 1, 1.0, 200))
    requests.close()
    with sqlite3.connect(fleet / DATABASE) as db:
        db.execute("UPDATE requests SET time = ? WHERE request_id = 'old'", (time.time() - 201 * 86400,))
        db.execute("UPDATE requests SET content = ?", ('{"prompt": "private"}',))  # as servers once stored it
    with running_server(ServeOptions(fleet_dir=fleet)) as (_, server):
        server.audit.flush()
    with sqlite3.connect(fleet / DATABASE) as db:
        assert db.execute("SELECT request_id FROM requests ORDER BY id").fetchall() == [("new",)]
    (pruned,) = [entry["data"] for entry in entries(fleet) if entry["event"] == "request_log.pruned"]
    assert (pruned["rows"], pruned["keep_days"], pruned["by"]["via"]) == (1, 200, "lorafleet serve")
    assert verify_chain(fleet).entries == 4  # audit.retention, request_log.pruned, serve.start, serve.stop
