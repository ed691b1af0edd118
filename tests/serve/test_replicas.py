"""Two `lorafleet serve` replicas on 127.0.0.1 sharing one PostgreSQL and one Redis (real servers,
tests/services.py) act as one gateway: one tenant's limit holds across both, a key revoked in the
shared state is refused by both within a second, and usage sums what both answered."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.governance.audit import list_segments
from lorafleet.serve.gateway.tenants import hash_key
from tests.services import RedisServer, free_port

pytest.importorskip("psycopg", reason="the shared state's drivers: pip install 'lorafleet[replicas]'")
pytest.importorskip("redis", reason="the shared state's drivers: pip install 'lorafleet[replicas]'")

TENANTS = [
    {"name": "ops", "key_sha256": hash_key("sk-ops"), "adapters": "*", "admin": True},
    {"name": "limited", "key_sha256": hash_key("sk-limited"), "adapters": "*", "requests_per_minute": 6},
    {"name": "counted", "key_sha256": hash_key("sk-counted"), "adapters": "*"},
    {"name": "steady", "key_sha256": hash_key("sk-steady"), "adapters": "*", "requests_per_minute": 1000},
]
MESSAGES = [{"role": "user", "content": "hello"}]


class Replica:
    def __init__(self, name: str, argv: list[str], log) -> None:
        self.name, self.port, self.log_path = name, free_port(), log.name
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lorafleet.cli", *argv, "--port", str(self.port), "--replica-id", name]
        self.process = subprocess.Popen(command, stdout=log, stderr=log)

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                said = Path(self.log_path).read_text(errors="replace")[-3000:]
                pytest.fail(f"replica {self.name} exited with {self.process.returncode}; its log ends:\n{said}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"replica {self.name} did not start in {seconds} s"
            time.sleep(0.2)

    def chat(self, key: str, max_tokens: int = 2) -> httpx.Response:
        body = {"model": "base", "messages": MESSAGES, "max_tokens": max_tokens}
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def stop(replicas: list[Replica]) -> None:
    """Stop them all at once (each takes seconds to shut down)."""
    running = [replica.process for replica in replicas if replica.process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def shared(postgres_server, tmp_path_factory):
    """The shared state's servers: the session's PostgreSQL (a database of its own) and a Redis of
    this module's own, which a test may stop and start again."""
    redis = RedisServer().start()
    yield postgres_server.database(), redis
    redis.remove()


@pytest.fixture(scope="module")
def replicas(shared, tmp_path_factory):
    from lorafleet.models.tiny import build_tiny_qwen2

    database, redis = shared
    root = tmp_path_factory.mktemp("replicas")
    build_tiny_qwen2(root / "fleet" / "base")
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump({"tenants": TENANTS}))
    argv = ["serve", "--fleet", str(root / "fleet"), "--keys", str(keys), "--state", database, "--redis", redis.url]
    argv += ["--price-input", "1000", "--price-output", "2000"]
    with (root / "replicas.log").open("wb") as log:
        started = [Replica(name, argv, log) for name in ("replica-1", "replica-2")]
    for replica in started:
        replica.fleet = root / "fleet"
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        stop(started)


@pytest.fixture
def admin(monkeypatch, capsys):
    """`lorafleet keys …` or `lorafleet usage …` run against a replica with the admin key: what it
    printed, as fields (`key:`, `id:`) and lines."""
    from lorafleet.cli import main

    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "sk-ops")

    def run(replica: Replica, *argv: str) -> dict:
        capsys.readouterr()
        assert main([*argv, "--url", replica.url]) == 0, capsys.readouterr().err
        lines = capsys.readouterr().out.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line.split()[0])
        return {name: value.split()[0] for name, value in fields.items() if value.split()} | {"lines": lines}

    return run


@pytest.fixture
def state(shared):
    """The shared state as an administrator reaches it (what `lorafleet keys` does)."""
    from lorafleet.serve.gateway.shared_state import SharedState

    database, redis = shared
    opened = SharedState(database, redis.url, "admin")
    yield opened
    opened.close()


@pytest.mark.slow
def test_one_tenants_request_limit_holds_across_both_replicas(replicas):
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda i: replicas[i % 2].chat("sk-limited"), range(20)))
    statuses = Counter(reply.status_code for reply in replies)
    assert statuses == {200: 6, 429: 14}, statuses
    refused = next(reply for reply in replies if reply.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1


@pytest.mark.slow
def test_keys_made_rotated_and_revoked_through_one_replica_hold_on_both_within_a_second(replicas, admin):
    first, second = replicas
    issued = admin(first, "keys", "create", "acme", "--adapters", "*", "--rpm", "100")
    key, key_id = issued["key"], issued["id"]
    within_a_second(replicas, lambda replica: replica.chat(key, max_tokens=1).status_code == 200, "accept")

    rotated = admin(first, "keys", "rotate", key_id)
    within_a_second(replicas, lambda replica: replica.chat(key, max_tokens=1).status_code == 401, "refuse")
    assert second.chat(rotated["key"], max_tokens=1).status_code == 200

    admin(first, "keys", "revoke", rotated["id"])
    within_a_second([second], lambda replica: replica.chat(rotated["key"], max_tokens=1).status_code == 401, "refuse")
    listed = admin(second, "keys", "list", "--tenant", "acme")
    assert [line.split()[0] for line in listed["lines"]] == [key_id, rotated["id"]]
    assert all(" revoked " in line for line in listed["lines"])

    logged = chain_entries(first, lambda entry: entry["event"] == "admin.key_revoke")
    assert key not in str(logged) and rotated["key"] not in str(logged)  # key ids only
    logged = [entry for entry in logged if entry["event"].startswith("admin.")]
    changes = {
        (entry["event"], entry["data"]["status"], entry["data"].get("issued_key_id")): entry["data"]["target"]
        for entry in logged
        if entry["event"] in ("admin.key_create", "admin.key_rotate", "admin.key_revoke")
    }
    assert changes == {
        ("admin.key_create", 200, key_id): {"tenant": "acme", "expires_at": None},
        ("admin.key_rotate", 200, rotated["id"]): {"key_id": key_id},
        ("admin.key_revoke", 200, None): {"key_id": rotated["id"]},
    }
    assert "admin.tenant_put" in {entry["event"] for entry in logged}  # keys create --rpm set the tenant up
    assert {entry["data"]["key_id"] for entry in logged} == {hash_key("sk-ops")[:16]}  # who asked


@pytest.mark.slow
def test_a_tenant_over_its_monthly_budget_gets_insufficient_quota_from_both_replicas(replicas, admin):
    first, second = replicas
    key = admin(first, "keys", "create", "thrifty", "--adapters", "*", "--monthly-tokens", "40")["key"]
    within_a_second(replicas, lambda replica: replica.chat(key, max_tokens=3).status_code == 200, "accept")
    for _ in range(20):
        if first.chat(key, max_tokens=3).status_code == 429:
            break
    refused = lambda replica: replica.chat(key, max_tokens=1).json().get("error", {}).get("code")  # noqa: E731
    within_a_second(replicas, lambda replica: refused(replica) == "insufficient_quota", "refuse")
    (used,) = admin(second, "usage", "--tenant", "thrifty")["lines"][1:]
    assert int(used.split()[4]) + int(used.split()[5]) >= 40


def chain_entries(replica: Replica, until=lambda entry: True, seconds: float = 5) -> list[dict]:
    """The entries of the replica's own audit chain, once one of them is `until` (admin events are
    written in the background, moments after the reply)."""
    deadline = time.monotonic() + seconds
    while True:
        chain = replica.fleet / "replicas" / replica.name / "audit"
        entries = [json.loads(line) for segment in list_segments(chain) for line in segment.read_text().splitlines()]
        if any(until(entry) for entry in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def within_a_second(replicas: list[Replica], done, what: str) -> None:
    """Every replica gets to `done` within a second of now."""
    start = time.monotonic()
    waiting = list(replicas)
    while waiting:
        waiting = [replica for replica in waiting if not done(replica)]
        assert time.monotonic() - start < 1.0, f"{[r.name for r in waiting]} do not {what} the key after a second"


@pytest.mark.slow
def test_usage_sums_what_both_replicas_answered(replicas, state, admin):
    replies = [replica.chat("sk-counted", max_tokens=3) for replica in replicas for _ in range(3)]
    assert all(reply.status_code == 200 for reply in replies)
    sent = [reply.json()["usage"] for reply in replies]
    (usage,) = state.usage(since=datetime.now(UTC).date(), tenant="counted")
    assert (usage.model, usage.requests) == ("base", 6)
    assert usage.prompt_tokens == sum(u["prompt_tokens"] for u in sent)
    assert usage.completion_tokens == sum(u["completion_tokens"] for u in sent)
    logged = [row for row in state.store.requests() if row["tenant"] == "counted"]
    assert Counter(row["replica"] for row in logged) == {"replica-1": 3, "replica-2": 3}
    assert {row["request_id"] for row in logged} == {reply.json()["id"] for reply in replies}
    printed = admin(replicas[1], "usage", "--since", datetime.now(UTC).date().isoformat(), "--tenant", "counted")
    (row,) = [line.split() for line in printed["lines"][1:]]
    cost = (usage.prompt_tokens * 1000 + usage.completion_tokens * 2000) / 1e6  # --price-input 1000 --price-output 2000
    assert usage.cost == pytest.approx(cost)
    assert row[1:] == ["counted", "base", "6", str(usage.prompt_tokens), str(usage.completion_tokens), f"{cost:.4f}"]


@pytest.mark.slow
def test_with_redis_stopped_both_replicas_refuse_with_503_never_500_and_recover_when_it_returns(replicas, shared):
    _, redis = shared
    redis.stop()
    try:
        refused = [replica.chat("sk-steady", max_tokens=1) for replica in replicas for _ in range(2)]
        assert {reply.status_code for reply in refused} == {503}  # the default policy: closed
        assert refused[0].json()["error"]["code"] == "state_unavailable" and refused[0].headers["retry-after"] == "1"
        for replica in replicas:
            metrics = httpx.get(f"{replica.url}/metrics", headers={"Authorization": "Bearer sk-ops"}).text
            assert 'lorafleet_state_unavailable_total{outcome="refused",store="redis"} 2.0' in metrics
    finally:
        redis.start()
    deadline = time.monotonic() + 5
    for replica in replicas:  # recovered, without a restart
        while (status := replica.chat("sk-steady", max_tokens=1).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.1)


@pytest.mark.slow
def test_a_replicas_console_checks_callers_against_the_shared_state(replicas, admin):
    first, second = replicas
    key = admin(first, "keys", "create", "console-ops", "--adapters", "*", "--admin")["key"]

    def console(replica: Replica, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{replica.url}/ui/api/tenants", headers=headers, timeout=30).status_code

    assert console(second, None) == 401
    within_a_second([second], lambda replica: console(replica, key) == 200, "let in")  # a key made live
    listed = httpx.get(f"{second.url}/ui/api/tenants", headers={"Authorization": f"Bearer {key}"}).json()
    assert "console-ops" in {row["name"] for row in listed["tenants"]} and listed["manages_keys"] is False
    admin(first, "keys", "revoke", hash_key(key)[:16])
    within_a_second([second], lambda replica: console(replica, key) == 401, "shut out")


@pytest.mark.slow
def test_a_replica_killed_mid_load_has_logged_every_request_it_answered_and_every_chain_verifies(
    replicas, state, admin, capsys
):
    """Runs last: it kills replica 2."""
    from lorafleet.cli import main

    victim = replicas[1]
    answered, stop = [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                reply = victim.chat("sk-counted", max_tokens=2)
            except httpx.TransportError:
                return  # the replica is gone
            if reply.status_code == 200:
                answered.append(reply.json()["id"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 8:
        assert time.monotonic() < deadline, "the replica answered too few requests"
        time.sleep(0.01)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    stop.set()
    for thread in threads:
        thread.join()

    logged = {row["request_id"] for row in state.store.requests() if row["replica"] == victim.name}
    assert set(answered) <= logged  # the request log holds every answered request
    entries = chain_entries(victim)
    in_chain = {entry["data"]["request_id"] for entry in entries if entry["event"] == "serve.request"}
    assert set(answered) <= in_chain and {entry["data"]["replica"] for entry in entries} == {victim.name}

    capsys.readouterr()
    assert main(["audit", "verify", str(victim.fleet)]) == 0, capsys.readouterr().err
    verified = capsys.readouterr().out
    assert "replica replica-1's audit log valid" in verified and "replica replica-2's audit log valid" in verified
