"""The models a caller sees and the admin's hand on them: GET /v1/models (the base under both of
its names, and the adapters the tenant may use), readiness (a real generation for admins only),
and loading or unloading an adapter at runtime (admin keys only; audited with who asked and the
weights' registry id)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from lorafleet.config import adapter_name_problem
from lorafleet.errors import LorafleetError
from lorafleet.serve.gateway.access import Access, who
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.tenants import Tenant


class Models:
    def __init__(self, server: FleetServer, access: Access) -> None:
        self.server, self.access = server, access

    def listing(self, request: Request) -> dict:
        return {"object": "list", "data": self._visible(self.access.authenticate(request))}

    def describe(self, request: Request, name: str) -> dict:
        found = [model for model in self._visible(self.access.authenticate(request)) if model["id"] == name]
        if not found:
            raise APIError(
                404, f"The model `{name}` does not exist or you do not have access to it.", "model_not_found", "model"
            )
        return found[0]

    async def ready(self, request: Request) -> dict:
        """For an admin (or anyone, on a server without keys): ready when a real one-token
        generation succeeds (503 otherwise, saying why), with the adapters served. For anyone
        else, who needs no key here: ready or not, from the backend's state, and nothing more;
        no generation runs for them, and no adapter is named."""
        if not self.access.is_admin(request):
            if not self.server.backend.alive():
                raise APIError(503, "not ready", "not_ready")
            return {"status": "ready"}
        problem = await self.server.backend.ready_problem()
        if problem is not None:
            raise APIError(503, problem, "not_ready")
        return {"status": "ready", "adapters": self.server.adapters}

    async def load(self, request: Request, name: str, path: str) -> dict:
        tenant = self.access.authenticate_admin(request)
        problem = adapter_name_problem(name)
        if problem:
            raise APIError(400, problem, "invalid_adapter_name", "name")
        try:
            await asyncio.to_thread(self.server.load_adapter, name, path)
        except LorafleetError as err:
            raise APIError(400, str(err), "adapter_load_failed") from err
        loaded = {"adapter": name, "path": path, "adapter_id": self.server.adapter_ids.get(name)}
        self.server.audit.record("serve.adapter_load", loaded | who(tenant))
        return {"id": name, "object": "model", "loaded": True}

    async def unload(self, request: Request, name: str) -> dict:
        tenant = self.access.authenticate_admin(request)
        unloaded = {"adapter": name, "adapter_id": self.server.adapter_ids.get(name)}
        try:
            await asyncio.to_thread(self.server.unload_adapter, name)
        except KeyError as err:
            raise APIError(404, f"adapter `{name}` is not loaded", "model_not_found") from err
        except LorafleetError as err:
            raise APIError(409, str(err), "adapter_busy") from err
        self.server.audit.record("serve.adapter_unload", unloaded | who(tenant))
        return {"id": name, "object": "model", "deleted": True}

    def _visible(self, tenant: Tenant | None) -> list[dict]:
        server = self.server
        models = [(name, None) for name in sorted(server.base_names)]
        models += [(name, server.base_name) for name in server.adapters if tenant is None or tenant.may_use(name)]
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "lorafleet", "parent": parent}
            for name, parent in models
        ]
