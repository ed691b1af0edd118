"""Who is asking and what they may do: the caller's key (its tenant; without --keys, anyone on
loopback), the models a tenant may use, the admin's rights, and the tenant's limits: requests per
minute, checked as a request arrives, and tokens per minute, reserved once the backend has
counted what the request can use and before anything generates (the serving state keeps keys and
windows: state.py).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from lorafleet.errors import LorafleetError
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.state import ServingState, StateUnavailable
from lorafleet.serve.gateway.tenants import Tenant


class Access:
    def __init__(self, server: FleetServer) -> None:
        self.server = server

    def authenticate(self, request: Request) -> Tenant | None:
        """The caller's tenant (None when the server has no keys); 401 for a missing or wrong key."""
        state = self.server.state
        if not state.keys_required:
            return None
        tenant = state.authenticate(_bearer_key(request))
        if tenant is None:
            raise APIError(401, "Incorrect or missing API key.", "invalid_api_key")
        return tenant

    def is_admin(self, request: Request) -> bool:
        """Whether the caller may administer the server (an admin key, or no keys at all), without
        refusing anyone: for the routes that answer everybody, but some more fully."""
        state = self.server.state
        if not state.keys_required:
            return True
        tenant = state.authenticate(_bearer_key(request))
        return tenant is not None and tenant.admin

    def authenticate_admin(self, request: Request) -> Tenant | None:
        tenant = self.authenticate(request)
        require_admin(tenant)
        return tenant

    def authenticate_scraper(self, request: Request) -> None:
        """With keys, /metrics needs one unless the server was started with --public-metrics."""
        if not self.server.options.public_metrics:
            self.authenticate(request)

    def resolve(self, tenant: Tenant | None, name: str) -> str | None:
        """The adapter a model name means (None: the base); 404, the same for a model that does not
        exist and one the tenant may not use, so that a tenant cannot learn another's adapters."""
        try:
            adapter = self.server.resolve_model(name)
        except KeyError:
            adapter = ""
        if adapter == "" or (adapter is not None and tenant is not None and not tenant.may_use(adapter)):
            raise APIError(
                404, f"The model `{name}` does not exist or you do not have access to it.", "model_not_found", "model"
            )
        return adapter

    async def reload_keys(self, request: Request) -> dict:
        """POST /v1/keys/reload (admin): the keys file read again (audited by the server either way)."""
        tenant = self.authenticate_admin(request)
        try:
            described = await asyncio.to_thread(self.server.reload_keys, who(tenant))
        except LorafleetError as err:
            raise APIError(400, str(err), "keys_reload_failed") from err
        return {"object": "keys", "sha256": described["sha256"], "tenants": sorted(described["tenants"])}


def _bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def require_admin(tenant: Tenant | None) -> None:
    if tenant is not None and not tenant.admin:
        raise APIError(403, "This key may not load or unload adapters.", "permission_denied")


def check_rate(state: ServingState, tenant: Tenant | None) -> None:
    """Count the request against the tenant's monthly budget and requests per minute (429 when
    either is spent)."""
    if tenant is None:
        return
    spent = state.over_budget(tenant)
    if spent is not None:  # OpenAI's refusal for a spent quota: 429 insufficient_quota, no retry time
        message = (
            f"You exceeded your current quota: {spent}. The budget renews on the 1st (UTC); "
            "an administrator can raise it."
        )
        raise APIError(429, message, "insufficient_quota")
    try:
        wait = state.count_request(tenant)
    except StateUnavailable as err:
        raise unavailable(err) from err
    if wait is not None:
        raise _too_many(f"Rate limit reached for tenant {tenant.name}; retry in {wait:.0f} s.", wait)


def reserve_tokens(state: ServingState, tenant: Tenant | None, most: int) -> object | None:
    """Hold the most a request can use (`PreparedRequest.most_tokens`: every prompt, and every
    choice of every prompt at its cap) against the tenant's tokens per minute before it runs, so
    that a burst cannot overrun the limit; accounting settles the reservation to what the request
    really used. A request that could use more than the tenant's whole minute is refused outright,
    as OpenAI refuses it ("Request too large"): no wait would let it run. None when the tenant has
    no token limit."""
    if tenant is None or tenant.tokens_per_minute is None:
        return None
    if tenant.exceeds_allowance(most):
        raise APIError(
            429,
            f"Request too large for tenant {tenant.name} on tokens per minute: limit {tenant.tokens_per_minute}, "
            f"requested up to {most} (each prompt, and n replies of up to max_tokens to each). Send fewer "
            "prompts, a smaller n or a smaller max_tokens",
            "rate_limit_exceeded",
        )
    try:
        reservation, wait = state.reserve_tokens(tenant, most)
    except StateUnavailable as err:
        raise unavailable(err) from err
    if reservation is None:
        raise _too_many(f"Token rate limit reached for tenant {tenant.name}; retry in {wait:.0f} s.", wait)
    return reservation


def unavailable(err: StateUnavailable) -> APIError:
    """What a caller gets when the serving state cannot be reached: 503, retry in a second."""
    message = f"The gateway's shared state is unavailable; retry shortly. ({err})"
    return APIError(503, message, "state_unavailable", headers={"Retry-After": "1"})


def who(tenant: Tenant | None) -> dict:
    """The tenant and key an audit entry names."""
    return {"tenant": tenant.name if tenant else None, "key_id": tenant.key_id if tenant else None}


def _too_many(message: str, wait: float) -> APIError:
    return APIError(429, message, "rate_limit_exceeded", headers={"Retry-After": str(max(1, int(wait + 0.999)))})
