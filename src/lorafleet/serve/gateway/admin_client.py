"""A client of the admin API (/v1/admin/*) for `lorafleet keys` and `lorafleet usage`: the CLI
manages keys through a running gateway, never the database behind it, so that every change is
audited by the gateway that made it and reaches every replica as one made through the API does.

Plain urllib: nothing to install on an operator's machine beyond lorafleet.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from lorafleet.errors import LorafleetError

TIMEOUT_S = 30


class AdminAPIError(LorafleetError):
    """The gateway refused an admin call or could not be reached."""


class AdminClient:
    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def tenants(self) -> list[dict]:
        return self._call("GET", "/v1/admin/tenants")["data"]

    def put_tenant(self, settings: dict) -> dict:
        return self._call("POST", "/v1/admin/tenants", settings)

    def keys(self, tenant: str | None = None) -> list[dict]:
        return self._call("GET", "/v1/admin/keys" + _query(tenant=tenant))["data"]

    def create_key(self, tenant: str, expires_at: str | None = None) -> dict:
        return self._call("POST", "/v1/admin/keys", {"tenant": tenant, "expires_at": expires_at})

    def revoke_key(self, key_id: str) -> dict:
        return self._call("POST", f"/v1/admin/keys/{urllib.parse.quote(key_id, safe='')}/revoke")

    def rotate_key(self, key_id: str) -> dict:
        return self._call("POST", f"/v1/admin/keys/{urllib.parse.quote(key_id, safe='')}/rotate")

    def usage(self, since: str | None = None, tenant: str | None = None) -> list[dict]:
        return self._call("GET", "/v1/admin/usage" + _query(since=since, tenant=tenant))["data"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise AdminAPIError(f"{method} {self.url}{path}: {err.code}: {_message(err)}") from err
        except urllib.error.URLError as err:
            raise AdminAPIError(
                f"cannot reach the gateway at {self.url}: {err.reason}; pass --url of a running lorafleet serve"
            ) from err


def _query(**params: str | None) -> str:
    given = {name: value for name, value in params.items() if value is not None}
    return "?" + urllib.parse.urlencode(given) if given else ""


def _message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return err.reason
