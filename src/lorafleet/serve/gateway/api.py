"""The OpenAI-compatible gateway in front of a `FleetServer`: its routes, each handing the request
to a serving object and returning its JSON or its stream.

Routes: GET /v1/models and /v1/models/{id}, POST /v1/chat/completions and /v1/completions (JSON
or SSE streaming; `n` choices, logprobs, structured output, tools), POST /v1/adapters and DELETE
/v1/adapters/{name} (admin; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter work too),
POST /v1/keys/reload (admin), /v1/admin/tenants, /v1/admin/keys and /v1/admin/usage (admin: keys,
tenants and usage managed live, admin.py), GET /health, /ready, /metrics, and the web console under
/ui (console/app.py). The gateway authenticates, applies
the tenant's adapters and limits, and records every call (access.py, accounting.py); the backend
generates. Every error is OpenAI's error object with the matching status, and a bad request never
disturbs the requests around it. A parameter of OpenAI's API that is not supported is refused
(400), never silently ignored (protocol.py). Every response carries an `x-request-id` header (the
client's own, when it sent a usable one).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorafleet.serve.gateway.access import Access
from lorafleet.serve.gateway.accounting import Recorder
from lorafleet.serve.gateway.admin import Admin
from lorafleet.serve.gateway.console.app import mount_console, served_console
from lorafleet.serve.gateway.errors import install_error_handlers
from lorafleet.serve.gateway.protocol import (
    AdapterLoadRequest,
    ChatCompletionRequest,
    TextCompletionRequest,
    VLLMLoadRequest,
)
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.serving import Completions
from lorafleet.serve.gateway.serving_models import Models

router = APIRouter()


def create_app(server: FleetServer) -> FastAPI:
    # No /docs or /redoc pages (they fetch /openapi.json without a key); /openapi.json needs one.
    app = FastAPI(title="lorafleet", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.state.access = Access(server)
    app.state.recorder = Recorder(server)
    app.state.completions = Completions(server, app.state.access, app.state.recorder)
    app.state.models = Models(server, app.state.access)
    app.state.admin = Admin(server, app.state.access)
    app.include_router(router)
    mount_console(app, served_console(server, app.state.recorder.metrics))  # /ui: console/app.py
    return app


def access(request: Request) -> Access:
    return request.app.state.access


def completions(request: Request) -> Completions:
    return request.app.state.completions


def models(request: Request) -> Models:
    return request.app.state.models


def admin(request: Request) -> Admin:
    return request.app.state.admin


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return _respond(await completions(request).create(request, ChatCompletionRequest))


@router.post("/v1/completions")
async def text_completions(request: Request) -> Response:
    return _respond(await completions(request).create(request, TextCompletionRequest))


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return models(request).listing(request)


@router.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str) -> dict:
    return models(request).describe(request, name)


@router.post("/v1/adapters")
async def load_adapter(request: Request, body: AdapterLoadRequest) -> dict:
    return await models(request).load(request, body.name, body.path)


@router.delete("/v1/adapters/{name}")
async def unload_adapter(request: Request, name: str) -> dict:
    return await models(request).unload(request, name)


@router.post("/v1/load_lora_adapter")
async def vllm_load(request: Request, body: VLLMLoadRequest) -> dict:
    return await models(request).load(request, body.lora_name, body.lora_path)


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(request: Request, body: VLLMLoadRequest) -> dict:
    return await models(request).unload(request, body.lora_name)


@router.post("/v1/keys/reload")
async def reload_keys(request: Request) -> dict:
    return await access(request).reload_keys(request)


@router.get("/v1/admin/tenants")
async def list_tenants(request: Request) -> dict:
    return await admin(request).list_tenants(request)


@router.post("/v1/admin/tenants")
async def put_tenant(request: Request) -> dict:
    return await admin(request).put_tenant(request)


@router.get("/v1/admin/keys")
async def list_keys(request: Request) -> dict:
    return await admin(request).list_keys(request)


@router.post("/v1/admin/keys")
async def create_key(request: Request) -> dict:
    return await admin(request).create_key(request)


@router.post("/v1/admin/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> dict:
    return await admin(request).revoke_key(request, key_id)


@router.post("/v1/admin/keys/{key_id}/rotate")
async def rotate_key(request: Request, key_id: str) -> dict:
    return await admin(request).rotate_key(request, key_id)


@router.get("/v1/admin/usage")
async def usage(request: Request) -> dict:
    return await admin(request).usage(request)


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict:
    return await models(request).ready(request)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    access(request).authenticate_scraper(request)
    exposition = request.app.state.recorder.metrics.exposition()
    return Response(exposition, media_type="text/plain; version=0.0.4")


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    access(request).authenticate(request)
    return JSONResponse(request.app.openapi())


def _respond(reply: dict | AsyncIterator[str]) -> Response:
    if isinstance(reply, dict):
        return JSONResponse(reply)
    return StreamingResponse(reply, media_type="text/event-stream")


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's own when it sent a usable one (for
    correlating its logs with ours), else a fresh one."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.fullmatch(sent) else f"req_{uuid.uuid4().hex}"

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
