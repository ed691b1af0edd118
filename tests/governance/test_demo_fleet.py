"""The demo's fleet directory carries governance records a verifier accepts and that match its files."""

from __future__ import annotations

import hashlib

import pytest

from lorafleet.cli import main
from lorafleet.demo.run import audit_summary
from lorafleet.governance.registry import Registry


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # trains the demo fleet (shared with the compression and eval tests)
def test_the_demo_fleet_has_a_valid_audit_log_and_registry_rows_matching_its_files(trained_demo, capsys):
    out, rows = trained_demo
    assert main(["audit", "verify", str(out)]) == 0
    verified = capsys.readouterr().out
    entries = verified.split("valid: ")[1].split(" entries")[0]
    assert audit_summary(out).startswith(f"audit log: {out / 'audit'} valid, {entries} entries")
    records = {lineage.name: lineage for lineage in Registry(out).all()}
    assert sorted(records) == sorted(row.adapter for row in rows)
    base_weights = {path.name: sha256(path) for path in (out / "base").glob("*.safetensors")}
    for name, lineage in records.items():
        adapter = out / "adapters" / name
        assert lineage.weights_sha256 == {"adapter_model.safetensors": sha256(adapter / "adapter_model.safetensors")}
        assert lineage.base["weights_sha256"] == base_weights
        (data,) = lineage.data
        assert data.sha256 == sha256(out / "data" / f"{name}.jsonl") and data.images == data.records > 0


@pytest.mark.slow  # trains the demo fleet (shared with the compression and eval tests)
def test_the_demo_records_each_adapters_held_out_accuracy_beside_the_bases(trained_demo):
    out, rows = trained_demo
    records = {lineage.name: lineage for lineage in Registry(out).all()}
    for row in rows:
        held_out = sha256(out / "data" / f"{row.adapter}-test.jsonl")
        scores = records[row.adapter].evaluation[held_out]
        assert (scores["accuracy"], scores["base_accuracy"]) == (row.adapter_accuracy, row.base_accuracy)
