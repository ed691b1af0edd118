"""Where a served request may take images from: data URLs always; files and web addresses only
from the directories and hosts the operator allowed. Nothing else is ever opened or fetched."""

from __future__ import annotations

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
        host = urlparse(url).hostname or ""
        if host not in self.allowed_hosts:
            raise DataError(f"{where}: images from {host or url} are not allowed")
        with urllib.request.urlopen(url, timeout=self.fetch_timeout_s) as response:  # noqa: S310 (allowlisted)
            return response.read(self.max_bytes + 1)
