"""The retention period comes from the fleet config and is applied by training, serving and `audit prune`."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from lorafleet.cli import main
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.governance.audit import AuditLog, list_segments, verify_chain
from lorafleet.governance.registry import DATABASE
from lorafleet.governance.retention import retention_days, set_retention
from lorafleet.serve.gateway.request_log import RequestLog, RequestRecord
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset


def test_the_fleet_configs_retention_is_stored_and_used_by_audit_prune(tiny_lm_dir, tmp_path, capsys):
    data = write_text_dataset(tmp_path / "hr.jsonl", n=4, seed=0)
    adapters = [AdapterSpec(name="hr", data=str(data), steps=1)]
    fleet = tmp_path / "fleet"
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(fleet), adapters=adapters, audit_keep_days=200)
    train_fleet(spec, False)
    assert retention_days(fleet) == 200
    assert json.loads((fleet / "audit" / "retention.json").read_text()) == {"keep_days": 200}
    (change,) = verify_chain(fleet).retention_changes  # the period in force is part of the chain
    assert (change["data"]["keep_days"], change["data"]["previous"]) == (200, None)
    assert change["data"]["by"]["via"] == "lorafleet train"
    assert main(["audit", "prune", str(fleet)]) == 0  # nothing is 200 days old yet
    assert "deleted 0 monthly segments" in capsys.readouterr().out
    assert verify_chain(fleet).entries > 0

    unset = tmp_path / "unset"
    train_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(unset), adapters=adapters), False)
    assert retention_days(unset) is None
    assert main(["audit", "prune", str(unset)]) == 2
    assert "pass --keep-days or set audit_keep_days" in capsys.readouterr().err


def test_a_retention_below_one_day_is_refused(tiny_lm_dir):
    spec = FleetSpec(base=str(tiny_lm_dir), output="x", adapters=[AdapterSpec(name="a", data="d")], audit_keep_days=0)
    with pytest.raises(ConfigError, match="audit_keep_days must be at least 1"):
        spec.validate("fleet.yaml")


def old_and_current_month(directory) -> None:
    AuditLog(directory, clock=lambda: "2001-01-15T12:00:00.000000Z").append("test.event", {"index": 0})
    AuditLog(directory).append("test.event", {"index": 1})


@pytest.mark.parametrize("days", ["0", "-5"])
def test_audit_prune_refuses_to_keep_less_than_a_day(tmp_path, capsys, days):
    old_and_current_month(tmp_path)
    assert main(["audit", "prune", str(tmp_path), "--keep-days", days]) == 2
    assert "keep at least 1 day" in capsys.readouterr().err
    assert [segment.name for segment in list_segments(tmp_path / "audit")][0] == "2001-01.jsonl"


def test_audit_prune_warns_below_six_months_and_records_who_pruned(tmp_path, capsys):
    old_and_current_month(tmp_path)
    assert main(["audit", "prune", str(tmp_path), "--keep-days", "30"]) == 0
    out, err = capsys.readouterr()
    assert "deleted 1 monthly segments: 2001-01.jsonl" in out
    assert "30 days is less than six months" in err and "Art. 19(1), 26(6)" in err
    (pruned,) = verify_chain(tmp_path).prunes
    assert pruned["data"]["keep_days"] == 30 and pruned["data"]["by"]["via"] == "lorafleet audit prune"


def test_audit_prune_refuses_to_keep_less_than_the_fleets_retention(tmp_path, capsys):
    old_and_current_month(tmp_path)
    set_retention(tmp_path, 400, via="lorafleet train")
    assert main(["audit", "prune", str(tmp_path), "--keep-days", "200"]) == 2
    assert "less than the fleet's retention of 400 days" in capsys.readouterr().err
    assert main(["audit", "prune", str(tmp_path)]) == 0  # the stored 400 days: 2001 is older
    assert verify_chain(tmp_path).first_seq == 2


def test_audit_prune_also_deletes_logged_requests_older_than_the_retention(tmp_path, capsys):
    old_and_current_month(tmp_path)
    requests = RequestLog(tmp_path / DATABASE)
    for request_id in ("old", "new"):
        requests.record(RequestRecord(request_id, "t", "base", 1, 1, 1.0, 200))
    requests.close()
    with sqlite3.connect(tmp_path / DATABASE) as db:
        db.execute("UPDATE requests SET time = ? WHERE request_id = 'old'", (time.time() - 201 * 86400,))
        db.execute("UPDATE requests SET content = ?", ('{"prompt": "private"}',))  # as servers once stored it
    assert main(["audit", "prune", str(tmp_path), "--keep-days", "200"]) == 0
    assert "deleted 1 logged requests older than 200 days" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / DATABASE) as db:
        assert db.execute("SELECT request_id FROM requests").fetchall() == [("new",)]
    report = verify_chain(tmp_path)
    assert [entry["event"] for entry in report.prunes] == ["audit.pruned"]
