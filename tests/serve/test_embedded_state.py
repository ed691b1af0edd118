"""The embedded serving state: the keys file, in-process windows and the fleet's SQLite request
log behind the `ServingState` interface, deciding exactly as before; and the embedded path loads
neither of the shared state's drivers."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from lorafleet.serve.gateway.embedded_state import EmbeddedState
from lorafleet.serve.gateway.request_log import RequestLog, RequestRecord
from lorafleet.serve.gateway.state import KeysAreReadOnly, Prices, TenantSettings
from lorafleet.serve.gateway.tenants import hash_key, load_tenants


@pytest.fixture
def embedded(tmp_path):
    path = tmp_path / "keys.yaml"
    tenants = [
        {"name": "finance-team", "key": "sk-finance", "adapters": ["finance"], "requests_per_minute": 2},
        {"name": "tight", "key": "sk-tight", "adapters": "*", "tokens_per_minute": 100},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    directory = load_tenants(path)
    state = EmbeddedState(lambda: directory, RequestLog(tmp_path / "lorafleet.sqlite"))
    yield state, directory
    state.close()


def test_the_embedded_state_is_the_keys_file_and_the_tenants_own_windows(embedded):
    state, directory = embedded
    finance = state.authenticate("sk-finance")
    assert finance is directory.tenants[0]  # the keys file's own tenant, windows and all
    assert state.authenticate("sk-wrong") is None and state.authenticate(None) is None
    assert [state.count_request(finance) is None for _ in range(3)] == [True, True, False]
    tight = state.authenticate("sk-tight")
    held, _ = state.reserve_tokens(tight, 80)
    assert state.reserve_tokens(tight, 30)[0] is None
    state.settle_tokens(tight, held, 50)
    assert state.reserve_tokens(tight, 30)[0] is not None
    assert [(k.key_id, k.tenant) for k in state.keys()] == [
        (hash_key("sk-finance")[:16], "finance-team"),
        (hash_key("sk-tight")[:16], "tight"),
    ]
    assert state.tenants()[1] == TenantSettings("tight", None, tokens_per_minute=100)


def test_without_keys_nobody_is_a_tenant(tmp_path):
    state = EmbeddedState(lambda: None, RequestLog(tmp_path / "lorafleet.sqlite"))
    assert state.authenticate("sk-anything") is None and state.keys() == [] and state.tenants() == []
    state.close()


def test_usage_is_summed_from_the_request_log(embedded):
    state, _ = embedded
    for i in range(3):
        state.log_request(RequestRecord(f"r{i}", "finance-team", "finance", 10, i, 5.0, 200))
    state.log_request(RequestRecord("r3", None, "base", 4, 1, 5.0, 200))
    today = datetime.now(UTC).date()
    rows = {(row.tenant, row.model): row for row in state.usage(since=today)}
    assert (rows[("finance-team", "finance")].requests, rows[("finance-team", "finance")].prompt_tokens) == (3, 30)
    assert rows[("finance-team", "finance")].completion_tokens == 3 and rows[(None, "base")].day == today
    assert [row.tenant for row in state.usage(since=today, tenant="finance-team")] == ["finance-team"]
    assert state.usage(since=today + timedelta(days=1)) == []
    priced = EmbeddedState(lambda: None, state.request_log, Prices(input_per_million=1e6, output_per_million=2e6))
    assert [row.cost for row in priced.usage(since=today, tenant="finance-team")] == [30 + 2 * 3]


def test_keys_cannot_be_changed_through_the_embedded_state_and_the_error_says_what_to_do(embedded):
    state, directory = embedded
    for change in (
        lambda: state.create_key("tight"),
        lambda: state.revoke_key("0123456789abcdef"),
        lambda: state.rotate_key("0123456789abcdef"),
        lambda: state.put_tenant(TenantSettings("new")),
    ):
        with pytest.raises(KeysAreReadOnly, match=f"keys file {directory.source}.*reload.*--state postgresql"):
            change()


@pytest.mark.parametrize("given", [{"state_url": "postgresql://db/lorafleet"}, {"redis_url": "redis://cache"}])
def test_the_shared_state_needs_both_postgresql_and_redis(fleet_dir, given):
    from lorafleet.errors import ConfigError
    from lorafleet.serve.gateway.server import FleetServer, ServeOptions

    with pytest.raises(ConfigError, match="give both --state postgresql://… and --redis redis://…, or neither"):
        FleetServer(ServeOptions(fleet_dir=fleet_dir, **given))


def test_the_embedded_path_imports_neither_postgresql_nor_redis_drivers():
    script = (
        "import sys\n"
        "import lorafleet.serve.gateway.api, lorafleet.serve.gateway.embedded_state, lorafleet.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'redis', 'asyncpg'))\n"
        "sys.exit(f'loaded: {loaded}' if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
