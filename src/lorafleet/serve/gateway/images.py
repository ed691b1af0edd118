"""Where a served request may take images from: data URLs always; files and web addresses only
from the directories and hosts the operator allowed. Nothing else is ever opened or fetched."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lorafleet.data.records import decode_data_url
from lorafleet.errors import DataError


@dataclass
class ImagePolicy:
    max_bytes: int = 10 * 2**20
    allowed_dirs: list[Path] = field(default_factory=list)  # for file:// URLs
    allowed_hosts: list[str] = field(default_factory=list)  # for http(s) URLs
    fetch_timeout_s: float = 10.0  # the whole fetch, connecting to the last byte

    def resolve(self, url: str, where: str) -> bytes:
        if url.startswith("data:"):
            data = decode_data_url(url, where)
        elif url.startswith("file://"):
            data = self._read_file(Path(urlparse(url).path), where)
        elif url.startswith(("http://", "https://")):
            data = self._fetch(url, where)
        else:
            raise DataError(f"{where}: image_url must be a data: URL (or an allowed file:// or http(s) URL)")
        if len(data) > self.max_bytes:
            raise DataError(f"{where}: image is {len(data)} bytes, more than the limit of {self.max_bytes}")
        return data

    def _read_file(self, path: Path, where: str) -> bytes:
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d.resolve()) for d in self.allowed_dirs):
            raise DataError(f"{where}: file:// images are not allowed from {path.parent}")
        if not resolved.is_file():
            raise DataError(f"{where}: image file {path} does not exist")
        return resolved.read_bytes()

    def _fetch(self, url: str, where: str) -> bytes:
        """GET an allowed image URL: the host and port must be on the allow-list (an entry without a
        port allows the scheme's default port only), redirects are never followed, the whole fetch
        is bounded in bytes and in time, and every failure reads the same to the client (a refused
        port and a silent one are indistinguishable: no port scanning through the server)."""
        target = urlparse(url)
        if not self._allowed(target):
            raise DataError(f"{where}: images from {target.netloc or url} are not allowed")
        try:
            data = _get(target, self.fetch_timeout_s, self.max_bytes)
        except (OSError, ValueError, http.client.HTTPException) as err:  # refusals, timeouts, resets, statuses
            raise DataError(f"{where}: the image could not be fetched from {target.netloc}") from err
        return data

    def _allowed(self, target) -> bool:
        if target.scheme not in ("http", "https") or not target.hostname:
            return False
        try:
            port = target.port or (443 if target.scheme == "https" else 80)
        except ValueError:
            return False
        for entry in self.allowed_hosts:
            host, _, allowed_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            default = 443 if target.scheme == "https" else 80
            if target.hostname == host and port == (int(allowed_port) if allowed_port else default):
                return True
        return False


def _get(target, seconds: float, max_bytes: int) -> bytes:
    """The body of a 200 answer to GET `target` within `seconds` in all, from connecting to the
    last byte (at most `max_bytes` + 1 of it read); anything else raises. A socket timeout bounds
    each read only, and a host sending a byte a second never trips it (it took 60 s for a 10 s
    limit), so a watchdog shuts the connection at the deadline. http.client follows no redirect."""
    deadline = time.monotonic() + seconds
    kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = kind(target.hostname, target.port, timeout=seconds)
    try:
        connection.connect()  # bounded by the socket timeout
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, (connection.sock,))
        watchdog.start()
        try:
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            connection.request("GET", path, headers={"User-Agent": "lorafleet", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status != 200:
                raise http.client.HTTPException(f"status {response.status}")
            data = bytearray()
            while len(data) <= max_bytes and (piece := response.read(64 * 1024)):
                data += piece
        finally:
            watchdog.cancel()
        if time.monotonic() > deadline:  # the watchdog cut it short: what was read is not the image
            raise TimeoutError(f"the fetch took more than {seconds} s")
        return bytes(data)
    finally:
        connection.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing left to stop
        sock.shutdown(socket.SHUT_RDWR)
