"""Keys, tenants and usage managed live, by an admin key: /v1/admin/tenants (list, create or
change), /v1/admin/keys (list, create, revoke, rotate) and /v1/admin/usage. Every call is written
to the audit log, refused or done, with who asked and what it touched (a key's id, never the key).

On the shared state a change made through one replica holds on every replica within a second;
the embedded state's keys are its keys file, so changes are refused there (409) with what to do
instead. The body is read only after the admin key is checked, as completions read theirs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import partial
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from lorafleet.serve.gateway.access import Access, who
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.state import (
    IssuedKey,
    KeyInfo,
    KeysAreReadOnly,
    StateUnavailable,
    TenantSettings,
    UsageRow,
)
from lorafleet.serve.gateway.tenants import Tenant

MAX_ADMIN_BODY = 64 * 1024


class TenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    adapters: list[str] | Literal["*"] = []
    admin: bool = False
    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    monthly_token_budget: PositiveInt | None = None
    monthly_cost_budget: PositiveFloat | None = None
    max_rows: PositiveInt | None = None

    def settings(self) -> TenantSettings:
        fields = self.model_dump()
        fields["adapters"] = None if self.adapters == "*" else frozenset(self.adapters)
        return TenantSettings(**fields)


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=200)
    expires_at: datetime | None = None  # ISO 8601; without a zone, UTC


class Admin:
    def __init__(self, server: FleetServer, access: Access) -> None:
        self.server, self.access = server, access

    async def list_tenants(self, request: Request) -> dict:
        caller = self.access.authenticate_admin(request)
        return self._audited(caller, "admin.tenants_list", {}, self.server.state.tenants, partial(_listing, _tenant))

    async def put_tenant(self, request: Request) -> dict:
        caller = self.access.authenticate_admin(request)
        body = await _read(request, TenantRequest)
        self._check_adapters(body)
        settings = body.settings()
        put = partial(self.server.state.put_tenant, settings)
        return self._audited(caller, "admin.tenant_put", _tenant(settings), put, lambda _: _tenant(settings))

    async def list_keys(self, request: Request) -> dict:
        caller = self.access.authenticate_admin(request)
        tenant = request.query_params.get("tenant")
        listed = partial(self.server.state.keys, tenant)
        return self._audited(caller, "admin.keys_list", {"tenant": tenant}, listed, partial(_listing, _key))

    async def create_key(self, request: Request) -> dict:
        caller = self.access.authenticate_admin(request)
        body = await _read(request, KeyRequest)
        expires = body.expires_at.replace(tzinfo=body.expires_at.tzinfo or UTC) if body.expires_at else None
        target = {"tenant": body.tenant, "expires_at": _time(expires)}
        create = partial(self.server.state.create_key, body.tenant, expires)
        return self._audited(caller, "admin.key_create", target, create, _issued)

    async def revoke_key(self, request: Request, key_id: str) -> dict:
        caller = self.access.authenticate_admin(request)
        revoke = partial(self.server.state.revoke_key, key_id)
        return self._audited(caller, "admin.key_revoke", {"key_id": key_id}, revoke, _key)

    async def rotate_key(self, request: Request, key_id: str) -> dict:
        caller = self.access.authenticate_admin(request)
        rotate = partial(self.server.state.rotate_key, key_id)
        return self._audited(caller, "admin.key_rotate", {"key_id": key_id}, rotate, _issued)

    async def usage(self, request: Request) -> dict:
        caller = self.access.authenticate_admin(request)
        since_text, tenant = request.query_params.get("since"), request.query_params.get("tenant")
        try:
            since = date.fromisoformat(since_text) if since_text else datetime.now(UTC).date().replace(day=1)
        except ValueError as err:
            message = f"since: {since_text!r} is not a date (YYYY-MM-DD)"
            raise APIError(400, message, "invalid_request_error", "since") from err
        read = partial(self.server.state.usage, since, tenant)
        target = {"since": since.isoformat(), "tenant": tenant}
        return self._audited(caller, "admin.usage", target, read, partial(_listing, _usage))

    def _check_adapters(self, body: TenantRequest) -> None:
        """A tenant granted an adapter nobody serves would only ever see 404s: refuse the typo."""
        if body.adapters == "*":
            return
        unknown = sorted(set(body.adapters) - set(self.server.adapters) - self.server.base_names)
        if unknown:
            served = ", ".join(sorted(self.server.adapters)) or "none"
            message = f"adapters: {unknown[0]!r} is not served here; the fleet's adapters: {served}"
            raise APIError(400, message, "invalid_request_error", "adapters")

    def _audited(
        self, caller: Tenant | None, event: str, target: dict, action: Callable[[], object], shape: Callable
    ) -> dict:
        """Run `action` and audit how it ended: who asked, what it touched, its status (and the id
        of a key it issued); the reply is `shape` of what it returned."""
        entry = who(caller) | {"target": target}
        try:
            result = shape(action())
        except KeyError as err:
            failure = APIError(404, f"no such {_thing(event)}: {err.args[0]}", "not_found")
        except KeysAreReadOnly as err:
            failure = APIError(409, str(err), "keys_read_only")
        except StateUnavailable as err:
            failure = APIError(503, f"the serving state is unavailable: {err}", "state_unavailable")
        else:
            issued = {"issued_key_id": result["id"]} if "key" in result else {}
            self.server.audit.record(event, entry | issued | {"status": 200})
            return result
        self.server.audit.record(event, entry | {"status": failure.status, "error": failure.message})
        raise failure


async def _read(request: Request, model: type[BaseModel]) -> BaseModel:
    body = await request.body()
    if len(body) > MAX_ADMIN_BODY:
        raise APIError(413, f"the body is over {MAX_ADMIN_BODY} bytes", "request_too_large")
    try:
        return model.model_validate(json.loads(body or b"{}"))
    except (ValueError, ValidationError) as err:
        raise APIError(400, f"invalid body: {err}", "invalid_request_error") from err


def _thing(event: str) -> str:
    return "tenant" if "tenant" in event else "key"


def _listing(shape: Callable, items: list) -> dict:
    return {"object": "list", "data": [shape(item) for item in items]}


def _tenant(settings: TenantSettings) -> dict:
    return {
        "object": "tenant",
        "name": settings.name,
        "adapters": "*" if settings.adapters is None else sorted(settings.adapters),
        "admin": settings.admin,
        "requests_per_minute": settings.requests_per_minute,
        "tokens_per_minute": settings.tokens_per_minute,
        "monthly_token_budget": settings.monthly_token_budget,
        "monthly_cost_budget": settings.monthly_cost_budget,
        "max_rows": settings.max_rows,
    }


def _key(info: KeyInfo) -> dict:
    return {
        "object": "api_key",
        "id": info.key_id,
        "tenant": info.tenant,
        "created_at": _time(info.created),
        "expires_at": _time(info.expires),
        "revoked_at": _time(info.revoked),
    }


def _issued(issued: IssuedKey) -> dict:
    return _key(issued.info) | {"key": issued.key}  # shown this once; the audit log never holds it


def _usage(row: UsageRow) -> dict:
    return {
        "day": row.day.isoformat(),
        "tenant": row.tenant,
        "model": row.model,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost": round(row.cost, 6),
    }


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
