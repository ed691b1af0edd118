"""Weights the fleet's registry has withdrawn (a person erased from what they learned) are not
served: not at start, not loaded at runtime, unless the operator forces it."""

from __future__ import annotations

import shutil

import pytest

from lorafleet.errors import AdapterError
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.lineage import Lineage, weight_hashes
from lorafleet.governance.registry import Registry
from lorafleet.serve.gateway.server import FleetServer, ServeOptions


def _withdraw(fleet, name: str) -> str:
    directory = FleetDir(fleet).adapter(name)
    lineage = Lineage(name, "adapter", str(directory), weight_hashes(directory), {})
    registry = Registry(fleet)
    registry.add(lineage)
    registry.withdraw(lineage, "trained on records of a person erased by erasure test", "2026-12-01T00:00:00Z")
    registry.close()
    return lineage.id


def test_a_withdrawn_adapter_is_refused_at_start_and_at_runtime_unless_forced(fleet_dir, tmp_path):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleet_dir, fleet, ignore=shutil.ignore_patterns("lorafleet.sqlite*", "audit"))
    weights = _withdraw(fleet, "finance")
    with pytest.raises(AdapterError, match=rf"'finance' \({weights[:12]}\) was withdrawn.*--serve-withdrawn"):
        FleetServer(ServeOptions(fleet_dir=fleet))

    forced = FleetServer(ServeOptions(fleet_dir=fleet, serve_withdrawn=True)).start()
    try:
        assert forced.adapter_ids["finance"] == weights
    finally:
        forced.close()

    shutil.move(FleetDir(fleet).adapter("finance"), fleet / "kept-finance")
    server = FleetServer(ServeOptions(fleet_dir=fleet)).start()
    try:
        assert "finance" not in server.adapters
        with pytest.raises(AdapterError, match="was withdrawn"):
            server.load_adapter("finance", "kept-finance")
        assert "finance" not in server.adapters
    finally:
        server.close()
