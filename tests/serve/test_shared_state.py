"""The shared serving state on a real PostgreSQL and a real Redis (tests/services.py): the schema
lorafleet creates and versions, keys kept as hashes, managed live and seen by every replica, the
request log and usage, and windows that hold one limit across replicas and decide as the
embedded windows do."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, date, datetime, timedelta

import pytest

pytest.importorskip("psycopg", reason="the shared state's drivers: pip install 'lorafleet[replicas]'")
pytest.importorskip("redis", reason="the shared state's drivers: pip install 'lorafleet[replicas]'")

import psycopg  # noqa: E402
import yaml  # noqa: E402

from lorafleet.errors import ConfigError  # noqa: E402
from lorafleet.serve.gateway.postgres_store import MIGRATIONS, PostgresStore  # noqa: E402
from lorafleet.serve.gateway.redis_windows import RedisWindows  # noqa: E402
from lorafleet.serve.gateway.request_log import RequestRecord  # noqa: E402
from lorafleet.serve.gateway.shared_state import REDIS_RETRY_SECONDS, SharedState  # noqa: E402
from lorafleet.serve.gateway.state import Prices, StateUnavailable, TenantSettings  # noqa: E402
from lorafleet.serve.gateway.tenants import Tenant, hash_key, load_tenants  # noqa: E402
from tests.services import PostgresServer, RedisServer, free_port  # noqa: E402


@pytest.fixture
def replicas(postgres_url, redis_url):
    """Two replicas' states on one database and one Redis."""
    states = [SharedState(postgres_url, redis_url, f"replica-{i}") for i in (1, 2)]
    yield states
    for state in states:
        state.close()


def table_text(url: str) -> str:
    """Every row of every table, as text."""
    with psycopg.connect(url) as db:
        tables = [row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(db.execute(f"SELECT * FROM {table}").fetchall()) for table in tables)


def test_the_schema_is_created_once_versioned_and_found_current_by_the_next_replica(postgres_url):
    PostgresStore(postgres_url).close()
    PostgresStore(postgres_url).close()  # a second replica: nothing to migrate
    with psycopg.connect(postgres_url) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_a_database_migrated_by_a_newer_lorafleet_is_refused_with_what_to_do(postgres_url):
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(ConfigError, match="newer than this lorafleet.*upgrade lorafleet"):
        PostgresStore(postgres_url)


def test_keys_are_stored_only_as_their_hashes(replicas, postgres_url):
    state, _ = replicas
    state.put_tenant(TenantSettings("acme", frozenset({"finance"})))
    issued = state.create_key("acme")
    stored = table_text(postgres_url)
    assert issued.key not in stored and issued.key[6:] not in stored
    assert hash_key(issued.key) in stored


def test_keys_are_created_listed_revoked_and_rotated(replicas):
    state, _ = replicas
    state.put_tenant(TenantSettings("acme", None, requests_per_minute=5))
    first = state.create_key("acme")
    tenant = state.authenticate(first.key)
    assert (tenant.name, tenant.adapters, tenant.requests_per_minute) == ("acme", None, 5)
    assert tenant.key_id == first.info.key_id

    rotated = state.rotate_key(first.info.key_id)
    assert state.authenticate(first.key) is None  # rotation revokes the old key at once
    assert state.authenticate(rotated.key).name == "acme"
    assert [(k.key_id, k.revoked is not None) for k in state.keys("acme")] == [
        (first.info.key_id, True),
        (rotated.info.key_id, False),
    ]

    state.revoke_key(rotated.info.key_id)
    assert state.authenticate(rotated.key) is None
    with pytest.raises(KeyError):
        state.rotate_key(rotated.info.key_id)  # a revoked key cannot be rotated back to life
    with pytest.raises(KeyError):
        state.create_key("nobody-by-that-name")
    with pytest.raises(KeyError):
        state.revoke_key("0123456789abcdef")


def test_a_key_revoked_through_one_replica_is_refused_by_the_other_within_a_second(replicas):
    one, two = replicas
    one.put_tenant(TenantSettings("acme", None))
    issued = one.create_key("acme")
    deadline = time.monotonic() + 1
    while two.authenticate(issued.key) is None:  # a new key reaches the other replica as fast
        assert time.monotonic() < deadline, "the other replica never saw the new key"
        time.sleep(0.01)
    one.revoke_key(issued.info.key_id)
    revoked = time.monotonic()
    while two.authenticate(issued.key) is not None:
        assert time.monotonic() - revoked < 1.0, "the other replica still accepts the revoked key"
        time.sleep(0.01)


def test_an_expired_key_is_refused(replicas):
    state, _ = replicas
    state.put_tenant(TenantSettings("acme", None))
    past = state.create_key("acme", expires=datetime.now(UTC) - timedelta(seconds=1))
    future = state.create_key("acme", expires=datetime.now(UTC) + timedelta(days=1))
    assert state.authenticate(past.key) is None
    assert state.authenticate(future.key).name == "acme"


def test_tenant_settings_changed_live_apply_to_its_keys(replicas):
    one, two = replicas
    one.put_tenant(TenantSettings("acme", frozenset({"legal"})))
    issued = one.create_key("acme")
    one.put_tenant(TenantSettings("acme", frozenset({"finance"}), admin=True, monthly_token_budget=1000))
    two.refresh()
    tenant = two.authenticate(issued.key)
    assert (tenant.adapters, tenant.admin) == (frozenset({"finance"}), True)
    assert two.tenants()[0].monthly_token_budget == 1000


def test_a_keys_file_is_imported_and_importing_it_again_revives_no_revoked_key(replicas, tmp_path):
    state, _ = replicas
    path = tmp_path / "keys.yaml"
    tenants = [
        {"name": "finance-team", "key": "sk-finance", "adapters": ["finance"], "tokens_per_minute": 500, "max_rows": 4},
        {"name": "ops", "key": "sk-ops", "adapters": "*", "admin": True},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    assert state.import_keys_file(load_tenants(path)) == 2
    finance = state.authenticate("sk-finance")
    assert (finance.tokens_per_minute, finance.max_rows) == (500, 4)  # every setting of the file, fair share too
    assert state.authenticate("sk-ops").admin
    state.revoke_key(hash_key("sk-ops")[:16])
    settings = {s.name: s for s in state.tenants()}["finance-team"]
    state.put_tenant(TenantSettings(**{**settings.__dict__, "monthly_cost_budget": 12.5}))
    assert state.import_keys_file(load_tenants(path)) == 0
    assert state.authenticate("sk-ops") is None
    assert {s.name: s for s in state.tenants()}["finance-team"].monthly_cost_budget == 12.5  # not in the file: kept


def test_replicas_starting_together_import_one_keys_file_at_once_without_an_error(postgres_url, redis_url, tmp_path):
    """Replicas started together (a deployment's rollout) import the same keys file at the same
    moment: each key is added once and no replica fails on the other's insert."""
    path = tmp_path / "keys.yaml"
    tenants = [{"name": f"team-{i}", "key": f"sk-team-{i}", "adapters": "*"} for i in range(20)]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    directory = load_tenants(path)
    states = [SharedState(postgres_url, redis_url, f"replica-{i}") for i in range(6)]
    together = threading.Barrier(len(states))
    added, failed = [], []

    def start(state: SharedState) -> None:
        together.wait()
        try:
            added.append(state.import_keys_file(directory))
        except Exception as error:  # what a replica's start-up would die of
            failed.append(repr(error))

    threads = [threading.Thread(target=start, args=(state,)) for state in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for state in states:
        state.close()
    assert failed == []
    assert sum(added) == len(tenants)


def test_every_request_is_logged_with_its_replica_and_usage_sums_it(replicas):
    one, two = replicas
    for i in range(6):
        state = one if i % 2 else two
        tenant = "finance-team" if i < 4 else None
        state.log_request(RequestRecord(f"r{i}", tenant, "finance", 10 + i, 5, 12.5, 200))
    one.log_request(RequestRecord("r6", "finance-team", "base", 7, 0, 3.0, 429, "Rate limit reached"))
    logged = one.store.requests()
    assert [row["request_id"] for row in logged] == [f"r{i}" for i in range(7)]
    assert {row["replica"] for row in logged} == {"replica-1", "replica-2"}
    today = datetime.now(UTC).date()
    usage = {(row.tenant, row.model): row for row in two.usage(since=today)}
    assert set(usage) == {("finance-team", "finance"), ("finance-team", "base"), (None, "finance")}
    finance = usage[("finance-team", "finance")]
    assert (finance.day, finance.requests, finance.prompt_tokens, finance.completion_tokens) == (today, 4, 46, 20)
    assert (usage[(None, "finance")].requests, usage[(None, "finance")].prompt_tokens) == (2, 29)
    assert [row.model for row in one.usage(since=today, tenant="finance-team")] == ["base", "finance"]
    assert one.usage(since=today + timedelta(days=1)) == []


def test_one_request_limit_holds_across_replicas_asked_at_once(replicas):
    one, two = replicas
    one.put_tenant(TenantSettings("acme", None, requests_per_minute=7))
    key = one.create_key("acme").key
    two.refresh()
    tenants = [one.authenticate(key), two.authenticate(key)]
    admitted = []
    start = threading.Barrier(8)

    def ask(state: SharedState, tenant: Tenant) -> None:
        start.wait()
        for _ in range(5):
            admitted.append(state.count_request(tenant) is None)

    threads = [threading.Thread(target=ask, args=(s, t)) for s, t in zip(replicas * 4, tenants * 4, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 7 and len(admitted) == 40


def test_token_reservations_hold_one_limit_across_replicas_asked_at_once(replicas):
    one, two = replicas
    one.put_tenant(TenantSettings("acme", None, tokens_per_minute=100))
    key = one.create_key("acme").key
    two.refresh()
    results = []
    start = threading.Barrier(10)

    def reserve(state: SharedState) -> None:
        start.wait()
        results.append(state.reserve_tokens(state.authenticate(key), 30))

    threads = [threading.Thread(target=reserve, args=(replicas[i % 2],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [reservation for reservation, _ in results if reservation is not None]
    assert len(held) == 3  # 3 x 30 fit under 100, a fourth would not
    assert all(0 < wait <= 60 for reservation, wait in results if reservation is None)
    one.settle_tokens(one.authenticate(key), held[0], 0)  # a request that used nothing gives its hold back
    assert two.reserve_tokens(two.authenticate(key), 30)[0] is not None


def test_redis_windows_decide_as_the_embedded_windows_do(replicas):
    """A random run of requests, reservations and settlements inside one window: the embedded
    tenant's own windows and Redis's admit and refuse the same ones."""
    state, _ = replicas
    settings = TenantSettings("acme", None, requests_per_minute=12, tokens_per_minute=400)
    state.put_tenant(settings)
    shared = state.authenticate(state.create_key("acme").key)
    embedded = settings.tenant(shared.key_sha256)
    rng = random.Random(0)
    held_shared, held_embedded, decisions = [], [], []
    for _ in range(80):
        action = rng.choice(["request", "reserve", "reserve", "settle"])
        if action == "request":
            shared_wait, embedded_wait = state.count_request(shared), embedded.retry_after()
            if embedded_wait is None:
                embedded.record_request()
            decisions.append((action, shared_wait is None, embedded_wait is None))
        elif action == "reserve":
            tokens = rng.randint(1, 150)
            shared_held, _ = state.reserve_tokens(shared, tokens)
            embedded_held, _ = embedded.reserve(tokens)
            decisions.append((action, shared_held is not None, embedded_held is not None))
            if shared_held is not None and embedded_held is not None:
                held_shared.append(shared_held)
                held_embedded.append(embedded_held)
        elif held_shared:
            i = rng.randrange(len(held_shared))
            used = rng.randint(0, 60)
            state.settle_tokens(shared, held_shared.pop(i), used)
            embedded.settle(held_embedded.pop(i), used)
    assert all(shared == embedded for _, shared, embedded in decisions), decisions
    assert {admitted for _, admitted, _ in decisions} == {True, False}  # both ways were decided


def test_the_windows_empty_as_their_minute_passes(redis_url):
    windows = RedisWindows(redis_url, window_seconds=0.5)
    assert windows.count_request("acme", 1, None) is None
    assert 0 < windows.count_request("acme", 1, None) <= 0.5
    reservation, _ = windows.reserve("acme", 80, 100)
    assert windows.reserve("acme", 30, 100)[0] is None
    time.sleep(0.6)
    assert windows.count_request("acme", 1, None) is None
    windows.settle("acme", reservation, 100)  # left the window: settling it counts nothing
    assert windows.reserve("acme", 100, 100)[0] is not None
    windows.close()


def test_an_unreachable_redis_or_postgresql_is_state_unavailable(postgres_url):
    windows = RedisWindows(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StateUnavailable, match="Redis at redis://127.0.0.1"):
        windows.count_request("acme", 1, None)
    with pytest.raises(StateUnavailable, match="PostgreSQL at postgresql://lorafleet@127.0.0.1"):
        PostgresStore(f"postgresql://lorafleet:secret@127.0.0.1:{free_port()}/x")


def test_usage_is_per_day_in_utc(replicas, postgres_url):
    state, _ = replicas
    state.log_request(RequestRecord("r0", "acme", "finance", 3, 4, 1.0, 200))
    with psycopg.connect(postgres_url) as db:
        db.execute("UPDATE usage_daily SET day = day - 3")
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    assert state.usage(since=yesterday) == []
    assert state.usage(since=date(2000, 1, 1))[0].prompt_tokens == 3


def test_redis_out_of_reach_is_refused_when_closed_and_held_per_replica_when_open_until_it_answers(postgres_url):
    redis = RedisServer().start()
    closed = SharedState(postgres_url, redis.url, "closed")
    opened = SharedState(postgres_url, redis.url, "open", when_unavailable="open")
    try:
        closed.put_tenant(TenantSettings("acme", None, requests_per_minute=2, tokens_per_minute=100))
        key = closed.create_key("acme").key
        opened.refresh()
        redis.stop()
        with pytest.raises(StateUnavailable):
            closed.count_request(closed.authenticate(key))
        with pytest.raises(StateUnavailable):  # and at once, not after another timeout
            closed.reserve_tokens(closed.authenticate(key), 10)
        assert closed.unavailable == {("redis", "refused"): 2}
        tenant = opened.authenticate(key)
        assert [opened.count_request(tenant) is None for _ in range(3)] == [True, True, False]  # this replica's own
        held, _ = opened.reserve_tokens(tenant, 90)
        assert opened.reserve_tokens(tenant, 20)[0] is None
        opened.settle_tokens(tenant, held, 10)
        assert opened.reserve_tokens(tenant, 20)[0] is not None
        assert opened.unavailable[("redis", "local_limits")] == 6

        redis.start()  # empty, on the same port
        time.sleep(REDIS_RETRY_SECONDS)
        assert closed.count_request(closed.authenticate(key)) is None  # back on Redis: recovered, no restart
        assert redis_client(redis).exists("{lorafleet:acme}:requests")
    finally:
        closed.close()
        opened.close()
        redis.remove()


def test_postgresql_out_of_reach_refuses_requests_until_it_answers_again():
    postgres = PostgresServer().start()
    redis = RedisServer().start()
    state = SharedState(postgres.database(), redis.url, "replica", refresh_seconds=0.05)
    try:
        state.put_tenant(TenantSettings("acme", None))
        key = state.create_key("acme").key
        tenant = state.authenticate(key)
        postgres.stop()
        deadline = time.monotonic() + 5
        while state.postgres_reachable:
            assert time.monotonic() < deadline, "the poll never noticed PostgreSQL was gone"
            time.sleep(0.05)
        assert state.authenticate(key) is tenant  # the keys in force stay while it is away
        with pytest.raises(StateUnavailable, match="PostgreSQL"):
            state.count_request(tenant)
        with pytest.raises(StateUnavailable):
            state.log_request(RequestRecord("r0", "acme", "base", 1, 1, 1.0, 200))
        assert state.unavailable == {("postgresql", "refused"): 1, ("postgresql", "unlogged"): 1}
        postgres.start()
        deadline = time.monotonic() + 10
        while not state.postgres_reachable:
            assert time.monotonic() < deadline, "the replica did not see PostgreSQL come back"
            time.sleep(0.05)
        assert state.count_request(tenant) is None
        state.log_request(RequestRecord("r1", "acme", "base", 1, 1, 1.0, 200))
        assert [row["request_id"] for row in state.store.requests()] == ["r1"]
    finally:
        state.close()
        redis.remove()
        postgres.remove()


def redis_client(server: RedisServer):
    import redis

    return redis.Redis(port=server.port)


def test_a_database_of_an_older_schema_is_migrated_and_keeps_its_rows(postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TIMESTAMPTZ DEFAULT now())")
        db.execute(MIGRATIONS[0])
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute(
            "INSERT INTO usage_daily (day, tenant, model, requests, prompt_tokens)"
            " VALUES ('2026-01-02', 'a', 'm', 3, 9)"
        )
    store = PostgresStore(postgres_url)
    (row,) = store.usage(since=date(2026, 1, 1))
    assert (row.requests, row.prompt_tokens, row.cost) == (3, 9, 0.0)
    store.close()
    with psycopg.connect(postgres_url) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_a_tenant_over_its_monthly_token_or_cost_budget_is_refused_by_every_replica(postgres_url, redis_url):
    prices = Prices(input_per_million=2_000.0, output_per_million=10_000.0)  # a token costs 0.002 and 0.01
    one, two = (SharedState(postgres_url, redis_url, f"r{i}", refresh_seconds=0.05, prices=prices) for i in (1, 2))
    try:
        one.put_tenant(TenantSettings("tokens", None, monthly_token_budget=100))
        one.put_tenant(TenantSettings("spend", None, monthly_cost_budget=0.5))
        keys = [one.create_key("tokens").key, one.create_key("spend").key]
        two.refresh()
        by_tokens, by_spend = (two.authenticate(key) for key in keys)
        assert two.over_budget(by_tokens) is None and two.over_budget(by_spend) is None
        one.log_request(RequestRecord("r0", "tokens", "base", 60, 39, 1.0, 200))  # 99 of 100
        one.log_request(RequestRecord("r1", "spend", "base", 100, 20, 1.0, 200))  # 0.2 + 0.2 = 0.4 of 0.5
        two.refresh_spend()
        assert two.over_budget(by_tokens) is None and two.over_budget(by_spend) is None
        one.log_request(RequestRecord("r2", "tokens", "base", 1, 0, 1.0, 200))
        one.log_request(RequestRecord("r3", "spend", "base", 0, 10, 1.0, 200))
        two.refresh_spend()
        assert two.over_budget(by_tokens) == "tenant tokens has used 100 of its 100 tokens this month"
        assert two.over_budget(by_spend) == "tenant spend has spent 0.5000 of its 0.5 this month"
        assert [round(row.cost, 6) for row in one.usage(since=date(2000, 1, 1), tenant="spend")] == [0.5]
    finally:
        one.close()
        two.close()
