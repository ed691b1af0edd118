"""Where a served request may take images from: data URLs always; files and web addresses only
from the directories and hosts the operator allowed. Nothing else is ever opened or fetched."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
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
    fetch_timeout_s: float = 10.0

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
        refused = DataError(f"{where}: the image could not be fetched from {target.netloc}")
        deadline = time.monotonic() + self.fetch_timeout_s
        try:
            with _NO_REDIRECTS.open(url, timeout=self.fetch_timeout_s) as response:
                if response.status != 200:
                    raise refused
                data = bytearray()
                while len(data) <= self.max_bytes:
                    if time.monotonic() > deadline:
                        raise refused
                    piece = response.read(64 * 1024)
                    if not piece:
                        break
                    data += piece
                return bytes(data)
        except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, timeouts, resets, redirects
            raise refused from err

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


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(newurl, code, "redirects are not followed", headers, fp)


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)
