"""Shipping audit entries off the host, in chain order, to a SIEM or a collector.

Destinations (`open_destination`):

- `syslog://HOST:PORT` — RFC 5424 messages over UDP (RFC 5426), one entry per datagram. UDP has
  no acknowledgement: a receiver that is down loses what was sent meanwhile. Use it where the
  network is trusted to deliver; use TCP or OTLP where it must not lose entries.
- `syslog+tcp://HOST:PORT` — RFC 5424 over TCP with octet-counting framing (RFC 6587). A refused
  or broken connection is retried with the same entries; what the kernel accepted before the
  receiver vanished cannot be known, so after a broken connection a receiver may see an entry
  twice (the same `seq` and hash: a duplicate it can drop), never miss one.
- `http://HOST:PORT/v1/logs` (or https) — OTLP/HTTP with the JSON encoding of OpenTelemetry's
  `ExportLogsServiceRequest`: one log record per entry, the entry as stored in its body, the
  event, seq, hash and prev as attributes. A 2xx answer acknowledges the batch; 429, 502, 503 and
  504 (and no answer) are retried with backoff, honouring Retry-After; any other answer is bad
  data, never retried (the OTLP specification), and counted as not shipped, as are the records a
  partial success rejects. A URL without a path gets `/v1/logs`.
- `-` or a file — the chosen format, one entry per line (`lorafleet audit export --out`).

`Delivery` sends batches in order, retrying a refused batch with exponential backoff and jitter
until it goes or the caller stops, and moves the `Cursor` after each delivered batch. `Shipper`
is the server's side: `offer` puts what was just written in a bounded queue and returns at once
(a full queue drops the entries and counts them; they are read back from the log later), and a
background thread delivers the queue, filling any gap in `seq` — entries written by another
process, or dropped — from the log itself, so the receiver gets the whole chain in order.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlsplit

import lorafleet
from lorafleet.errors import AuditError, ConfigError
from lorafleet.governance.audit import parse_time
from lorafleet.governance.export import ChainReader, Cursor, format_entry, jsonl_line, syslog_line

RETRYABLE_HTTP = {429, 502, 503, 504}
OTLP_PATH = "/v1/logs"


class DeliveryFailed(Exception):
    """A batch did not reach the receiver; `retry_after` seconds when it said how long to wait."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Destination(Protocol):
    def send(self, entries: list[dict]) -> int:
        """Deliver `entries` in order; returns how many the receiver rejected as bad data (not to
        be sent again). DeliveryFailed when it may be tried again."""
        ...

    def close(self) -> None: ...


def open_destination(target: str, fmt: str = "jsonl", stream: IO[str] | None = None) -> Destination:
    """A destination from `--to` / `--out`: a syslog or OTLP URL, '-' (stdout) or a file path."""
    scheme = urlsplit(target).scheme
    if scheme in ("syslog", "syslog+udp", "syslog+tcp"):
        host, port = _host_port(target, 514)
        return SyslogTcp(host, port) if scheme == "syslog+tcp" else SyslogUdp(host, port)
    if scheme in ("http", "https"):
        return OtlpHttp(target)
    if "://" in target:
        raise ConfigError(f"--to {target}: use syslog://HOST:PORT (UDP), syslog+tcp://HOST:PORT or an OTLP http(s) URL")
    return LineStream(stream or sys.stdout if target == "-" else Path(target).open("a", encoding="utf-8"), fmt)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"{url}: no host; write it as syslog://HOST:PORT")
    return parts.hostname, parts.port or default_port


class LineStream:
    def __init__(self, stream: IO[str], fmt: str) -> None:
        self.stream, self.fmt = stream, fmt

    def send(self, entries: list[dict]) -> int:
        self.stream.write("".join(format_entry(entry, self.fmt) + "\n" for entry in entries))
        self.stream.flush()
        return 0

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


class SyslogUdp:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, entries: list[dict]) -> int:
        try:
            for entry in entries:
                self.socket.sendto(syslog_line(entry).encode(), self.address)
        except OSError as err:
            raise DeliveryFailed(f"syslog://{self.address[0]}:{self.address[1]}: {err}") from err
        return 0

    def close(self) -> None:
        self.socket.close()


class SyslogTcp:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.address, self.timeout = (host, port), timeout
        self.socket: socket.socket | None = None

    def send(self, entries: list[dict]) -> int:
        frames = b"".join(_octet_counted(syslog_line(entry).encode()) for entry in entries)
        try:
            if self.socket is None or _closed_by_peer(self.socket):
                self.close()
                self.socket = socket.create_connection(self.address, timeout=self.timeout)
            self.socket.sendall(frames)
        except OSError as err:
            self.close()
            raise DeliveryFailed(f"syslog+tcp://{self.address[0]}:{self.address[1]}: {err}") from err
        return 0

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


def _octet_counted(message: bytes) -> bytes:
    return str(len(message)).encode() + b" " + message


def _closed_by_peer(connection: socket.socket) -> bool:
    """A receiver that closed the connection: readable with nothing to read (it never sends)."""
    connection.setblocking(False)
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        connection.setblocking(True)
        connection.settimeout(10.0)


class OtlpHttp:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"{url}: no host; write it as http://HOST:4318/v1/logs")
        self.url, self.parts, self.timeout = url, parts, timeout
        self.path = (parts.path if parts.path not in ("", "/") else OTLP_PATH) + (
            f"?{parts.query}" if parts.query else ""
        )
        self.connection: http.client.HTTPConnection | None = None

    def send(self, entries: list[dict]) -> int:
        body = json.dumps(otlp_logs_request(entries)).encode()
        try:
            status, headers, answer = self._post(body)
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise DeliveryFailed(f"{self.url}: {err}") from err
        if status in RETRYABLE_HTTP:
            raise DeliveryFailed(f"{self.url}: HTTP {status}", _retry_after(headers.get("retry-after")))
        if not 200 <= status < 300:
            print(
                f"lorafleet: {self.url} refused {len(entries)} audit entries as bad data: HTTP {status}",
                file=sys.stderr,
            )
            return len(entries)
        return _rejected(answer)

    def _post(self, body: bytes) -> tuple[int, dict, bytes]:
        if self.connection is None:
            kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            self.connection = kind(self.parts.hostname, self.parts.port, timeout=self.timeout)
        self.connection.request("POST", self.path, body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = response.read()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, answer

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _rejected(answer: bytes) -> int:
    try:
        partial = json.loads(answer or b"{}").get("partialSuccess") or {}
        return int(partial.get("rejectedLogRecords") or 0)
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 0


def otlp_logs_request(entries: list[dict]) -> dict:
    """An ExportLogsServiceRequest in OTLP's JSON encoding (lowerCamelCase keys, 64-bit integers
    as decimal strings, enums as numbers): one LogRecord per entry."""
    records = [
        {
            "timeUnixNano": str(_unix_nanos(entry["time"])),
            "observedTimeUnixNano": str(time.time_ns()),
            "severityNumber": 13 if entry["event"].endswith("failed") else 9,  # WARN, INFO
            "severityText": "WARN" if entry["event"].endswith("failed") else "INFO",
            "body": {"stringValue": jsonl_line(entry)},
            "attributes": [
                _attribute("event.name", entry["event"]),
                {"key": "lorafleet.audit.seq", "value": {"intValue": str(entry["seq"])}},
                _attribute("lorafleet.audit.hash", entry["hash"]),
                _attribute("lorafleet.audit.prev", entry["prev"]),
            ],
        }
        for entry in entries
    ]
    resource = {"attributes": [_attribute("service.name", "lorafleet"), _attribute("host.name", socket.gethostname())]}
    scope = {"name": "lorafleet.audit", "version": lorafleet.__version__}
    return {"resourceLogs": [{"resource": resource, "scopeLogs": [{"scope": scope, "logRecords": records}]}]}


def _attribute(key: str, value: str) -> dict:
    return {"key": key, "value": {"stringValue": value}}


def _unix_nanos(moment: str) -> int:
    stamp = parse_time(moment)
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


@dataclass
class ShipCounts:
    shipped: int = 0
    unshipped: int = 0  # entries that could not be shipped when first tried (down, refused) or did not fit the queue
    rejected: int = 0  # entries the receiver refused as bad data: never sent again


class Delivery:
    """Delivers batches in order to one destination and keeps the cursor after the last one."""

    def __init__(
        self,
        destination: Destination,
        cursor: Cursor | None,
        stop: threading.Event,
        max_backoff_s: float = 30.0,
        log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    ) -> None:
        self.destination, self.cursor, self.stop = destination, cursor, stop
        self.max_backoff_s, self.log = max_backoff_s, log
        self.counts = ShipCounts()
        self.lock = threading.Lock()

    def ship(self, entries: list[dict]) -> bool:
        """Send `entries` until delivered (True) or the caller stops (False: nothing moved)."""
        backoff, failed_once = 0.2, False
        while not self.stop.is_set():
            try:
                rejected = self.destination.send(entries)
            except DeliveryFailed as err:
                if not failed_once:
                    with self.lock:
                        self.counts.unshipped += len(entries)
                    self.log(f"lorafleet: audit entries {_span(entries)} not shipped, retrying: {err}")
                failed_once = True
                self.stop.wait(err.retry_after if err.retry_after is not None else backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self.lock:
                self.counts.shipped += len(entries) - rejected
                self.counts.rejected += rejected
            if self.cursor is not None:
                self.cursor.advance(entries[-1])
            return True
        return False


def _span(entries: list[dict]) -> str:
    return f"seq {entries[0]['seq']}..{entries[-1]['seq']}"


class Shipper:
    """Ships what the server writes to the audit log, as it writes it, without ever blocking it."""

    def __init__(
        self,
        fleet_dir: str | Path,
        destination: Destination,
        cursor: Cursor,
        queue_size: int = 10_000,
        batch_size: int = 100,
        max_backoff_s: float = 30.0,
        poll_s: float = 5.0,
    ) -> None:
        self.stop, self._closing = threading.Event(), threading.Event()
        self.delivery = Delivery(destination, cursor, self.stop, max_backoff_s)
        self.reader = ChainReader(fleet_dir, cursor.seq, cursor.hash)
        self.cursor, self.batch_size, self.poll_s = cursor, batch_size, poll_s
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="lorafleet-audit-ship", daemon=True)
        self._thread.start()

    @property
    def counts(self) -> ShipCounts:
        return self.delivery.counts

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def offer(self, entries: list[dict]) -> None:
        """Queue entries just written; a full queue drops (and counts) them: the log keeps them."""
        for entry in entries:
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                with self.delivery.lock:
                    self.counts.unshipped += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Ship what is queued, waiting at most `timeout_s` for the receiver; what is left goes
        at the next start (the cursor says where)."""
        self._closing.set()
        with contextlib.suppress(queue.Full):  # a full queue: the thread is busy and sees the flag soon
            self._queue.put_nowait(None)  # wake it from its wait
        self._thread.join(timeout_s)
        self.stop.set()
        self._thread.join()
        self.delivery.destination.close()

    def _run(self) -> None:
        try:
            self._catch_up(None)  # what was written while no server shipped it
            while not self.stop.is_set():
                entries = self._next_batch()
                if entries:
                    self._catch_up(entries[0]["seq"] - 1)
                    self._ship(_contiguous(entries, self.cursor.seq))
                    self._catch_up(entries[-1]["seq"])  # gaps inside the batch, and the reader kept in step
                elif self._closing.is_set():
                    self._catch_up(None)
                    return
                else:
                    self._catch_up(None)  # entries other processes (a training run) wrote meanwhile
        except AuditError as err:  # a log that does not verify is never shipped as if it did
            print(f"lorafleet: audit shipping STOPPED: {err}", file=sys.stderr)

    def _next_batch(self) -> list[dict]:
        try:
            batch = [self._queue.get(timeout=0.1 if self._closing.is_set() else self.poll_s)]
        except queue.Empty:
            return []
        while len(batch) < self.batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return [entry for entry in batch if entry is not None and entry["seq"] > self.cursor.seq]

    def _ship(self, entries: list[dict]) -> None:
        if entries:
            self.delivery.ship(entries)

    def _catch_up(self, up_to_seq: int | None) -> None:
        """Ship from the log every entry after the cursor (up to `up_to_seq`)."""
        if up_to_seq is not None and up_to_seq <= self.cursor.seq:
            return
        self.reader.after_seq, self.reader.after_hash = self.cursor.seq, self.cursor.hash
        entries = self.reader.read(up_to_seq)
        for start in range(0, len(entries), self.batch_size):
            if not self.delivery.ship(entries[start : start + self.batch_size]):
                return


def _contiguous(entries: list[dict], after_seq: int) -> list[dict]:
    """The entries that follow `after_seq` one by one, up to the first gap."""
    run = []
    for entry in entries:
        if entry["seq"] != after_seq + len(run) + 1:
            break
        run.append(entry)
    return run


def ship_chain(
    reader: ChainReader, delivery: Delivery, follow: bool, poll_s: float = 1.0, batch_size: int = 100
) -> int:
    """`lorafleet audit export`: deliver every entry the reader has not read, then (following)
    what is appended, until `delivery.stop` is set. Returns how many were delivered."""
    count = 0
    while not delivery.stop.is_set():
        entries = reader.read()
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            if not delivery.ship(batch):
                return count
            count += len(batch)
        if not follow:
            return count
        delivery.stop.wait(poll_s)
    return count
