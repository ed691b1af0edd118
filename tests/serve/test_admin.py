"""The admin API on the embedded state (a real server on 127.0.0.1): admin keys only, every call
audited with its outcome, the keys file listed by key id, changes refused with what to do
instead, and usage summed from the request log."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from lorafleet.governance.audit import list_segments
from lorafleet.serve.gateway.server import ServeOptions
from lorafleet.serve.gateway.tenants import hash_key, load_tenants
from tests.serve.conftest import KEYS, running_server

ROUTES = [
    ("GET", "/v1/admin/tenants"),
    ("POST", "/v1/admin/tenants"),
    ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys/0123456789abcdef/revoke"),
    ("POST", "/v1/admin/keys/0123456789abcdef/rotate"),
    ("GET", "/v1/admin/usage"),
]


@pytest.fixture(scope="module")
def served(fleet_dir, keys_file, tmp_path_factory):
    import shutil

    fleet = tmp_path_factory.mktemp("admin") / "fleet"
    shutil.copytree(fleet_dir, fleet, ignore=shutil.ignore_patterns("lorafleet.sqlite*", "audit"))
    with running_server(ServeOptions(fleet_dir=fleet, tenants=load_tenants(keys_file))) as (url, server):
        yield url, server, fleet


def call(url: str, method: str, path: str, key: str | None, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=30)


def audited(server, fleet, event: str) -> list[dict]:
    server.audit.flush()
    lines = [
        json.loads(line) for segment in list_segments(fleet / "audit") for line in segment.read_text().splitlines()
    ]
    return [entry["data"] for entry in lines if entry["event"] == event]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_admin_route_needs_an_admin_key(served, method, path):
    url, _, _ = served
    assert call(url, method, path, None).status_code == 401
    refused = call(url, method, path, KEYS["finance-team"])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"


def test_the_keys_file_is_listed_by_key_id_and_the_listing_is_audited(served):
    url, server, fleet = served
    keys = call(url, "GET", "/v1/admin/keys", KEYS["ops"]).json()["data"]
    assert {key["id"]: key["tenant"] for key in keys}[hash_key(KEYS["legal-team"])[:16]] == "legal-team"
    assert all("key" not in key for key in keys)
    tenants = {t["name"]: t for t in call(url, "GET", "/v1/admin/tenants", KEYS["ops"]).json()["data"]}
    assert tenants["ops"]["adapters"] == "*" and tenants["finance-team"]["adapters"] == ["finance"]
    (entry,) = audited(server, fleet, "admin.keys_list")
    assert entry["status"] == 200 and entry["tenant"] == "ops" and entry["key_id"] == hash_key(KEYS["ops"])[:16]


def test_changing_keys_of_a_keys_file_is_refused_with_what_to_do_and_audited(served, keys_file):
    url, server, fleet = served
    refused = call(url, "POST", "/v1/admin/keys", KEYS["ops"], {"tenant": "finance-team"})
    assert refused.status_code == 409
    message = refused.json()["error"]["message"]
    assert str(keys_file) in message and "--state postgresql://" in message
    (entry,) = audited(server, fleet, "admin.key_create")
    assert (entry["status"], entry["target"]["tenant"]) == (409, "finance-team")
    revoke = call(url, "POST", "/v1/admin/keys/0123456789abcdef/revoke", KEYS["ops"])
    assert revoke.status_code == 409 and audited(server, fleet, "admin.key_revoke")[0]["status"] == 409


def test_a_tenant_granted_an_adapter_nobody_serves_is_refused_naming_it(served):
    url, _, _ = served
    refused = call(url, "POST", "/v1/admin/tenants", KEYS["ops"], {"name": "new", "adapters": ["fiannce"]})
    assert refused.status_code == 400 and "'fiannce' is not served here" in refused.json()["error"]["message"]
    bad = call(url, "POST", "/v1/admin/tenants", KEYS["ops"], {"name": "new", "requests_per_minute": 0})
    assert bad.status_code == 400 and "requests_per_minute" in bad.json()["error"]["message"]


def test_usage_sums_what_the_gateway_served(served):
    url, _, _ = served
    body = {"model": "finance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answered = [call(url, "POST", "/v1/chat/completions", KEYS["finance-team"], body).json() for _ in range(2)]
    today = datetime.now(UTC).date().isoformat()
    rows = call(url, "GET", f"/v1/admin/usage?since={today}&tenant=finance-team", KEYS["ops"]).json()["data"]
    assert [(row["day"], row["model"], row["requests"]) for row in rows] == [(today, "finance", 2)]
    assert rows[0]["completion_tokens"] == sum(reply["usage"]["completion_tokens"] for reply in answered)
    bad = call(url, "GET", "/v1/admin/usage?since=yesterday", KEYS["ops"])
    assert bad.status_code == 400 and "YYYY-MM-DD" in bad.json()["error"]["message"]
