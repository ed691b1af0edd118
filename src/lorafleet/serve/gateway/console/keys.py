"""Tenants and keys from the console: the list always; creating, revoking and rotating a key
only where the server manages its keys file (`lorafleet serve --keys FILE --manage-keys`).

A change is made to the keys file itself, so that the file stays the one record of who may call
(a restart, SIGHUP and `POST /v1/keys/reload` all read it): the new file is checked by the same
loader the server uses, written beside the old one and renamed over it, then the server reloads
it (which the audit log records with the file's new hash), and the change itself is audited with
who made it. Only a key's SHA-256 is ever written; a new key is shown once, to the admin who asked.
The file is rewritten as YAML from its parsed content, so comments in it are not kept.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from lorafleet.config import read_yaml
from lorafleet.errors import ConfigError
from lorafleet.serve.gateway.tenants import TenantDirectory, hash_key, load_tenants

KEY_PREFIX = "sk-lf-"  # as `lorafleet keys new` makes them


def tenant_rows(tenants: TenantDirectory | None) -> list[dict]:
    if tenants is None:
        return []
    return [
        {
            "name": tenant.name,
            "key_id": tenant.key_id,
            "admin": tenant.admin,
            "adapters": "*" if tenant.adapters is None else sorted(tenant.adapters),
            "requests_per_minute": tenant.requests_per_minute,
            "tokens_per_minute": tenant.tokens_per_minute,
        }
        for tenant in tenants.tenants
    ]


class KeysFile:
    """Edits a keys file in place; `reload(by)` makes the server use the edited file and audits it,
    `by` naming who asked (tenant and key id)."""

    def __init__(self, path: Path, reload: Callable[[dict], None]) -> None:
        self.path = path
        self.reload = reload
        self._lock = threading.Lock()  # one edit at a time: each reads the file the last one wrote

    def create(
        self, name: str, adapters: list[str] | str, admin: bool, rpm: int | None, tpm: int | None, by: dict
    ) -> str:
        key = new_key()
        entry: dict = {"name": name, "key_sha256": hash_key(key), "adapters": adapters, "admin": admin}
        entry |= {"requests_per_minute": rpm} if rpm else {}
        entry |= {"tokens_per_minute": tpm} if tpm else {}

        def add(entries: list[dict]) -> None:
            if any(existing.get("name") == name for existing in entries):
                raise ConfigError(f"{self.path}: a tenant named {name!r} exists already; rotate its key instead")
            entries.append(entry)

        self._change(add, by)
        return key

    def revoke(self, name: str, by: dict) -> str:
        """Remove the tenant's key (and so the tenant): its next request is refused. Returns its key id."""
        revoked = []

        def remove(entries: list[dict]) -> None:
            index = self._index(entries, name)
            revoked.append(_key_sha256(entries[index])[:16])
            del entries[index]
            if not entries:
                raise ConfigError(f"{self.path}: {name!r} is the last tenant; a keys file needs at least one")

        self._change(remove, by)
        return revoked[0]

    def rotate(self, name: str, by: dict) -> str:
        """A new key for the tenant, the old one refused from now on. Returns the new key."""
        key = new_key()

        def replace(entries: list[dict]) -> None:
            entry = entries[self._index(entries, name)]
            entry.pop("key", None)
            entry["key_sha256"] = hash_key(key)

        self._change(replace, by)
        return key

    def _index(self, entries: list[dict], name: str) -> int:
        for index, entry in enumerate(entries):
            if entry.get("name") == name:
                return index
        raise ConfigError(f"{self.path}: no tenant named {name!r}")

    def _change(self, edit: Callable[[list[dict]], None], by: dict) -> None:
        with self._lock:
            self._write(edit)
            self.reload(by)

    def _write(self, edit: Callable[[list[dict]], None]) -> None:
        raw = read_yaml(self.path, "keys file") or {}
        entries = raw.get("tenants") if isinstance(raw, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"{self.path}: expected 'tenants:' with a list of tenants")
        edit(entries)
        for entry in entries:  # a plain key never goes back into the file, only its hash
            if isinstance(entry, dict) and "key" in entry:
                entry["key_sha256"] = hash_key(str(entry.pop("key")))
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(yaml.safe_dump(raw, sort_keys=False))
        os.chmod(partial, self.path.stat().st_mode & 0o777)
        try:
            load_tenants(partial)  # the server's own checks, before the file in force is touched
        except ConfigError:
            partial.unlink()
            raise
        os.replace(partial, self.path)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _key_sha256(entry: dict) -> str:
    return str(entry["key_sha256"]) if "key_sha256" in entry else hash_key(str(entry.get("key", "")))
