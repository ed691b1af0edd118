"""KEYS.yaml validation and the per-tenant sliding-window limits."""

from __future__ import annotations

import pytest
import yaml

from lorafleet.errors import ConfigError
from lorafleet.serve.gateway.tenants import Tenant, hash_key, load_tenants


def write(tmp_path, tenants) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ({"name": "a", "key": "k", "key_sha256": hash_key("k")}, "exactly one of"),
        ({"name": "a"}, "exactly one of"),
        ({"name": "a", "key_sha256": "abc"}, "64 hex digits"),
        ({"name": "a", "key": "k", "adpaters": ["x"]}, "unknown field 'adpaters'"),
        ({"name": "a", "key": "k", "requests_per_minute": 0}, "positive integer"),
        ({"name": "a", "key": "k", "admin": "false"}, "admin must be true or false"),
    ],
)
def test_bad_tenants_are_named(tmp_path, tenant, message):
    with pytest.raises(ConfigError, match=message):
        load_tenants(write(tmp_path, [tenant]))


def test_keys_are_kept_only_as_hashes(tmp_path):
    directory = load_tenants(write(tmp_path, [{"name": "a", "key": "sk-secret", "adapters": ["x"]}]))
    assert "sk-secret" not in repr(directory.tenants)
    assert directory.authenticate("sk-secret").name == "a"
    assert directory.authenticate("sk-other") is None and directory.authenticate(None) is None


def test_limits_use_a_sliding_one_minute_window():
    tenant = Tenant("t", hash_key("k"), None, requests_per_minute=2, tokens_per_minute=100)
    tenant.record_request(now=0.0)
    tenant.record_request(now=10.0)
    assert tenant.retry_after(now=20.0) == pytest.approx(40.0)  # the first request leaves at t=60
    assert tenant.retry_after(now=60.5) is None
    tenant.record_tokens(150, now=61.0)
    assert tenant.retry_after(now=62.0) == pytest.approx(59.0)
    assert tenant.retry_after(now=121.5) is None


def test_a_tenant_naming_an_adapter_the_fleet_lacks_stops_the_server_at_start(fleet_dir, tmp_path):
    """A typo in the keys file would otherwise surface as 404s for that tenant, long after start."""
    from lorafleet.serve.gateway.server import FleetServer, ServeOptions

    keys = write(tmp_path, [{"name": "finance-team", "key": "k", "adapters": ["finance", "fiannce"]}])
    with pytest.raises(ConfigError) as refused:
        FleetServer(ServeOptions(fleet_dir=fleet_dir, tenants=load_tenants(keys)))
    message = str(refused.value)
    assert "tenant 'finance-team'" in message and "adapter 'fiannce'" in message
    assert "the fleet's adapters: finance, legal" in message and str(keys) in message


def test_a_reloaded_keys_file_naming_a_missing_adapter_keeps_the_keys_in_force(fleet_dir, tmp_path):
    from lorafleet.serve.gateway.server import FleetServer, ServeOptions

    keys = write(tmp_path, [{"name": "legal-team", "key": "k", "adapters": ["base", "legal"]}])  # base: always served
    server = FleetServer(ServeOptions(fleet_dir=fleet_dir, tenants=load_tenants(keys))).start()
    try:
        in_force = server.options.tenants
        write(tmp_path, [{"name": "legal-team", "key": "k", "adapters": ["legl"]}])
        with pytest.raises(ConfigError, match="tenant 'legal-team' may use adapter 'legl'"):
            server.reload_keys({"tenant": None, "key_id": None, "signal": "SIGHUP"})
        assert server.options.tenants is in_force
    finally:
        server.close()


def test_limits_in_exponent_notation_are_numbers(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("tenants:\n  - {name: a, key: k, requests_per_minute: 6e1, tokens_per_minute: 2e4}\n")
    (tenant,) = load_tenants(path).tenants
    assert (tenant.requests_per_minute, tenant.tokens_per_minute) == (60, 20000)


def test_the_token_window_keeps_a_running_total_through_reserve_settle_and_expiry():
    tenant = Tenant("t", hash_key("k"), None, tokens_per_minute=100)
    assert tenant.exceeds_allowance(101) and not tenant.exceeds_allowance(100)
    assert tenant.reserve(101, now=0.0)[0] is None, "more than the whole minute never fits, even in an empty window"
    first, _ = tenant.reserve(60, now=0.0)
    assert tenant.reserve(50, now=1.0) == (None, pytest.approx(59.0))
    tenant.settle(first, 10)  # it used less than it held: room for the next one
    second, _ = tenant.reserve(50, now=1.0)
    assert second is not None and tenant.retry_after(now=2.0) is None
    assert tenant.reserve(41, now=2.0)[0] is None and tenant.reserve(40, now=2.0)[0] is not None
    tenant.settle(second, 50)
    assert tenant.retry_after(now=30.0) == pytest.approx(30.0)  # 100 used: full until the first leaves
    assert tenant.retry_after(now=60.5) is None  # the first has left the window
    tenant.settle(first, 1000)  # settled after it left: it no longer counts
    assert tenant.reserve(10, now=60.5)[0] is not None
