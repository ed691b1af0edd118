"""The retention period comes from the fleet config and is applied by training, serving and `audit prune`."""

from __future__ import annotations

import json

import pytest

from lorafleet.cli import main
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.errors import ConfigError
from lorafleet.governance.audit import retention_days, verify_chain
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
