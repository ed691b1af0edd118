"""The audit log leaves the host in chain order, each entry with its seq and hashes: to a real syslog
receiver (UDP and TCP) and a real OTLP/HTTP logs receiver on 127.0.0.1, both written here. An
export restarted in the middle loses no entry and sends none twice; while the receiver is down,
entries wait, are counted, and arrive when it is back; the server ships as it writes, never
waiting on the receiver."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorafleet.cli import main
from lorafleet.governance.audit import AuditLog, read_head, verify_chain
from lorafleet.governance.export import ChainReader, Cursor, cef_line, jsonl_line, shipping_cursor
from lorafleet.governance.shipping import Delivery, Shipper, open_destination, ship_chain
from lorafleet.serve.gateway.audit_trail import AuditTrail
from lorafleet.serve.gateway.metrics import Metrics

SYSLOG = re.compile(
    r"^<(?P<pri>\d+)>1 (?P<time>\S+) (?P<host>\S+) lorafleet - (?P<msgid>\S+) "
    r'\[lorafleet@32473 seq="(?P<seq>\d+)" hash="(?P<hash>[0-9a-f]{64})" prev="(?P<prev>[0-9a-f]{64})"\] '
    "\ufeff(?P<msg>.*)$",
    re.S,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def entry_from_syslog(message: str) -> dict:
    """The entry a syslog message carries, checked against its structured data."""
    match = SYSLOG.match(message)
    assert match, message
    entry = json.loads(match["msg"])
    assert (str(entry["seq"]), entry["hash"], entry["prev"]) == (match["seq"], match["hash"], match["prev"])
    severity = 4 if entry["event"].endswith("failed") else 6  # warning, informational
    assert (
        match["msgid"] == entry["event"] and match["time"] == entry["time"] and int(match["pri"]) == 13 * 8 + severity
    )
    return entry


class SyslogTcpReceiver:
    """RFC 6587 octet-counted RFC 5424 messages over TCP."""

    def __init__(self, port: int) -> None:
        self.port, self.entries, self.listener = port, [], None

    def start(self) -> SyslogTcpReceiver:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        buffer = b""
        with connection:
            while chunk := connection.recv(65536):
                buffer += chunk
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    self.entries.append(entry_from_syslog(rest[: int(length)].decode()))
                    buffer = rest[int(length) :]


class OtlpReceiver:
    """OTLP/HTTP logs, JSON encoding: checks the request's shape as the specification sets it and
    keeps each record's entry. `refuse` answers 503 with Retry-After that many times first."""

    def __init__(self, port: int, refuse: int = 0) -> None:
        self.port, self.entries, self.refuse, self.requests = port, [], refuse, 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/logs" and self.headers["Content-Type"] == "application/json"
                receiver.requests += 1
                if receiver.refuse:
                    receiver.refuse -= 1
                    self._answer(503, {"message": "busy"}, {"Retry-After": "0"})
                    return
                receiver.entries += [entry_from_otlp(record) for record in log_records(body)]
                self._answer(200, {})

            def _answer(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def log_records(body: dict) -> list[dict]:
    (resource_logs,) = body["resourceLogs"]
    attributes = {a["key"]: a["value"]["stringValue"] for a in resource_logs["resource"]["attributes"]}
    assert attributes["service.name"] == "lorafleet"
    (scope_logs,) = resource_logs["scopeLogs"]
    assert scope_logs["scope"]["name"] == "lorafleet.audit"
    return scope_logs["logRecords"]


def entry_from_otlp(record: dict) -> dict:
    assert record["timeUnixNano"].isdigit() and record["severityNumber"] in (9, 13)  # int64 as a string, enum a number
    entry = json.loads(record["body"]["stringValue"])
    attributes = {a["key"]: a["value"] for a in record["attributes"]}
    assert attributes["lorafleet.audit.seq"] == {"intValue": str(entry["seq"])}
    assert attributes["lorafleet.audit.hash"]["stringValue"] == entry["hash"]
    assert attributes["lorafleet.audit.prev"]["stringValue"] == entry["prev"]
    assert attributes["event.name"]["stringValue"] == entry["event"]
    return entry


def append(fleet: Path, count: int, start: int = 0) -> None:
    log = AuditLog(fleet)
    for index in range(start, start + count):
        log.append("test.event", {"index": index})


def assert_whole_chain(received: list[dict], fleet: Path) -> None:
    """Every entry of the log once, in order, exactly as stored."""
    stored = [json.loads(line) for path in sorted((fleet / "audit").glob("*.jsonl")) for line in path.open()]
    assert [entry["seq"] for entry in received] == [entry["seq"] for entry in stored]
    assert received == stored


def test_each_format_carries_the_entry_with_its_position_and_hashes(tmp_path):
    fleet = tmp_path / "fleet"
    append(fleet, 3)
    AuditLog(fleet).append("serve.keys_reload_failed", {"error": "a|b=c\nd"})
    out = tmp_path / "copy.jsonl"
    assert main(["audit", "export", str(fleet), "--format", "jsonl", "--out", str(out)]) == 0
    assert verify_chain(out).entries == 4  # the copy verifies on its own
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text() == "".join(jsonl_line(entry) + "\n" for entry in entries)

    *header, extension = cef_line(entries[-1]).split("|", 7)  # a '|' in the extension needs no escape
    assert header[:2] + header[4:] == [
        "CEF:0",
        "lorafleet",
        "serve.keys_reload_failed",
        "serve.keys_reload_failed",
        "5",
    ]
    assert f"externalId=4 cs1Label=hash cs1={entries[-1]['hash']} cs2Label=prev cs2={entries[-1]['prev']}" in extension
    message = extension.split(" msg=", 1)[1]
    assert "\\=" in message  # '=' escaped in an extension value; unescaped, the data comes back
    assert json.loads(re.sub(r"\\(.)", r"\1", message)) == {"error": "a|b=c\nd"}

    syslog = tmp_path / "copy.log"
    assert main(["audit", "export", str(fleet), "--format", "syslog", "--out", str(syslog), "--from-seq", "2"]) == 0
    lines = syslog.read_text().splitlines()
    assert [entry_from_syslog(line)["seq"] for line in lines] == [2, 3, 4]
    assert lines[-1].startswith("<108>1 ")  # a failure is a warning: facility 13, severity 4


def test_syslog_over_udp_reaches_a_real_receiver(tmp_path):
    fleet = tmp_path / "fleet"
    append(fleet, 5)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    port = receiver.getsockname()[1]
    assert main(["audit", "export", str(fleet), "--to", f"syslog://127.0.0.1:{port}"]) == 0
    received = [entry_from_syslog(receiver.recv(65536).decode()) for _ in range(5)]
    receiver.close()
    assert_whole_chain(received, fleet)


@pytest.mark.slow
def test_a_followed_export_restarted_in_the_middle_loses_nothing_and_repeats_nothing(tmp_path):
    fleet, state = tmp_path / "fleet", tmp_path / "position.json"
    append(fleet, 5)
    receiver = SyslogTcpReceiver(free_port()).start()
    command = [sys.executable, "-m", "lorafleet", "audit", "export", str(fleet), "--follow", "--poll", "0.05"]
    command += ["--to", f"syslog+tcp://127.0.0.1:{receiver.port}", "--state", str(state)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}

    def run_until(count: int) -> None:
        exporter = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        try:
            writer = threading.Thread(target=append, args=(fleet, 20, len(receiver.entries)))
            writer.start()  # the chain grows while it is followed
            wait_for(lambda: len(receiver.entries) >= count)
            writer.join()
        finally:
            exporter.send_signal(signal.SIGTERM)
            _, errors = exporter.communicate(timeout=30)
        assert exporter.returncode == 0, errors

    run_until(15)  # stopped in the middle of the stream
    assert Cursor.load(state).seq == receiver.entries[-1]["seq"]
    run_until(45)  # resumes after the last entry delivered
    wait_for(lambda: len(receiver.entries) == 45)
    receiver.stop()
    assert_whole_chain(receiver.entries, fleet)


def test_an_otlp_export_waits_for_a_receiver_that_is_down_and_honours_its_retry_after(tmp_path):
    fleet, port = tmp_path / "fleet", free_port()
    append(fleet, 7)
    stop = threading.Event()
    delivery = Delivery(open_destination(f"http://127.0.0.1:{port}"), Cursor(tmp_path / "pos.json"), stop, 0.2)
    exporter = threading.Thread(target=ship_chain, args=(ChainReader(fleet), delivery, True, 0.05, 3))
    exporter.start()
    wait_for(lambda: delivery.counts.unshipped >= 3)  # nobody listens: the first batch waits, counted
    receiver = OtlpReceiver(port, refuse=2).start()  # back, but busy twice (503, Retry-After: 0)
    append(fleet, 4, start=7)
    wait_for(lambda: len(receiver.entries) == 11)
    stop.set()
    exporter.join()
    receiver.stop()
    assert receiver.requests >= 6 and delivery.counts.shipped == 11
    assert_whole_chain(receiver.entries, fleet)


@pytest.mark.slow
def test_the_server_ships_as_it_writes_through_a_receiver_outage_and_a_restart(tmp_path):
    fleet, port = tmp_path / "fleet", free_port()
    append(fleet, 2)  # written before any server shipped: caught up from the log
    target = f"http://127.0.0.1:{port}"

    def start_trail(queue_size: int) -> AuditTrail:
        cursor = Cursor.load(shipping_cursor(fleet, target))
        shipper = Shipper(fleet, open_destination(target), cursor, queue_size, batch_size=4, max_backoff_s=0.2)
        return AuditTrail(fleet, shipper=shipper)

    trail = start_trail(queue_size=5)
    metrics = Metrics(lambda: 0, lambda: trail.failures, lambda: trail.shipper)
    began = time.monotonic()
    for index in range(30):  # the receiver is down: recording never waits for it
        trail.record("serve.request", {"index": index})
    trail.flush()
    assert time.monotonic() - began < 5
    wait_for(lambda: trail.shipper.counts.unshipped > 0)
    scrape = metrics.exposition().decode()
    assert re.search(r"^lorafleet_audit_unshipped_total [1-9]", scrape, re.M), scrape
    assert re.search(r"^lorafleet_audit_ship_queue \d", scrape, re.M)

    receiver = OtlpReceiver(port).start()
    written = read_head(fleet / "audit")["seq"]  # the 2 before and the 30 served, some dropped from the queue
    wait_for(lambda: trail.shipper.cursor.seq == written)
    trail.close()  # a restart of the server
    trail = start_trail(queue_size=100)
    for index in range(5):
        trail.record("serve.request", {"index": 30 + index})
    trail.close()
    receiver.stop()
    assert_whole_chain(receiver.entries, fleet)
