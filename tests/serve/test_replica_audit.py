"""Each gateway replica keeps its own audit chain, its id in every entry; a request's entry can be
awaited until it is written; `lorafleet audit verify FLEET` verifies the fleet's chain and every
replica's, and names the one that fails."""

from __future__ import annotations

import json

from lorafleet.cli import main
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import AuditLog, list_segments
from lorafleet.serve.gateway.audit_trail import AuditTrail


def test_a_replicas_chain_names_it_in_every_entry_and_a_durable_entry_is_written_when_its_future_is_done(tmp_path):
    home = FleetDir(tmp_path).replica("replica-1")
    trail = AuditTrail(home, replica="replica-1")
    try:
        trail.record("serve.start", {"fleet": str(tmp_path)})
        written = trail.record_durably("serve.request", {"request_id": "r1"})
        written.result(timeout=30)
        chain = FleetDir(tmp_path).replica_audits()
        assert chain == [home / "audit"]
        lines = [json.loads(line) for segment in list_segments(chain[0]) for line in segment.read_text().splitlines()]
        assert [(e["event"], e["data"]["replica"]) for e in lines] == [
            ("serve.start", "replica-1"),
            ("serve.request", "replica-1"),
        ]
    finally:
        trail.close()


def test_audit_verify_checks_the_fleets_chain_and_every_replicas_and_names_a_broken_one(tmp_path, capsys):
    AuditLog(tmp_path).append("train.start", {})
    for replica in ("replica-1", "replica-2"):
        log = AuditLog(FleetDir(tmp_path).replica(replica))
        log.append("serve.start", {"replica": replica})
        log.append("serve.request", {"replica": replica, "request_id": "r"})
    assert main(["audit", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "audit log valid: 1 entries" in out and "replica replica-2's audit log valid: 2 entries" in out

    (segment,) = list_segments(FleetDir(tmp_path).replica("replica-2") / "audit")
    segment.write_text(segment.read_text().replace('"request_id":"r"', '"request_id":"x"'))
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert "replica replica-2's audit log NOT valid" in capsys.readouterr().err


def test_a_replica_id_that_is_not_a_plain_name_is_refused(tmp_path):
    import pytest

    from lorafleet.errors import ConfigError

    for bad in ("../elsewhere", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(ConfigError, match="replica id"):
            FleetDir(tmp_path).replica(bad)
