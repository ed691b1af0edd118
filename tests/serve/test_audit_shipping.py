"""`lorafleet serve --audit-ship-to URL`: the server ships its audit log as it writes it, and its
/metrics say what was shipped and what could not be."""

from __future__ import annotations

import re
import shutil

from lorafleet.serve.gateway.accounting import Recorder
from lorafleet.serve.gateway.server import FleetServer, ServeOptions
from tests.governance.test_export import OtlpReceiver, assert_whole_chain, free_port, wait_for


def test_a_served_fleet_ships_its_audit_log_and_counts_it_in_metrics(fleet_dir, tmp_path):
    fleet = tmp_path / "fleet"
    shutil.copytree(fleet_dir, fleet, ignore=shutil.ignore_patterns("lorafleet.sqlite*", "audit"))
    receiver = OtlpReceiver(free_port()).start()
    server = FleetServer(ServeOptions(fleet_dir=fleet, audit_ship_to=f"http://127.0.0.1:{receiver.port}")).start()
    try:
        wait_for(lambda: [entry["event"] for entry in receiver.entries] == ["serve.start"])
        scrape = Recorder(server).metrics.exposition().decode()
        assert re.search(r"^lorafleet_audit_shipped_total 1\.0$", scrape, re.M), scrape
        assert re.search(r"^lorafleet_audit_unshipped_total 0\.0$", scrape, re.M)
    finally:
        server.close()
    receiver.stop()
    assert [entry["event"] for entry in receiver.entries] == ["serve.start", "serve.stop"]
    assert_whole_chain(receiver.entries, fleet)
