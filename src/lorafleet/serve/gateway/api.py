"""The OpenAI-compatible gateway in front of a `FleetServer`.

Routes: GET /v1/models, POST /v1/chat/completions (JSON or SSE streaming), POST /v1/adapters and
DELETE /v1/adapters/{name} (admin; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter work
too), GET /health, /ready, /metrics. The gateway authenticates, applies the tenant's adapters and
limits, and records every call; the backend generates. Every error is OpenAI's error object with
the matching status, and a bad request never disturbs the requests around it.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from lorafleet.config import adapter_name_problem
from lorafleet.errors import LorafleetError
from lorafleet.serve.gateway import openai_format
from lorafleet.serve.gateway.calls import Call
from lorafleet.serve.gateway.errors import APIError, error_response
from lorafleet.serve.gateway.metrics import Metrics
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.tenants import Tenant


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, logprobs: false, ...)

    model: str
    messages: list[dict]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)


class AdapterLoadRequest(BaseModel):
    name: str  # checked by config.adapter_name_problem, as in fleet specs
    path: str


class VLLMLoadRequest(BaseModel):
    lora_name: str
    lora_path: str = ""


def create_app(server: FleetServer) -> FastAPI:
    # No /docs or /redoc pages (they fetch /openapi.json without a key); /openapi.json needs one.
    app = FastAPI(title="lorafleet", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(server.backend.running)
    _install_error_handlers(app)

    def authenticate(request: Request) -> Tenant | None:
        if server.options.tenants is None:
            return None
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        tenant = server.options.tenants.authenticate(key)
        if tenant is None:
            raise APIError(401, "Incorrect or missing API key.", "invalid_api_key")
        return tenant

    def resolve(tenant: Tenant | None, name: str) -> str | None:
        try:
            adapter = server.resolve_model(name)
        except KeyError:
            adapter = ""
        if adapter == "" or (adapter is not None and tenant is not None and not tenant.may_use(adapter)):
            raise APIError(
                404, f"The model `{name}` does not exist or you do not have access to it.", "model_not_found", "model"
            )
        return adapter

    def record(call: Call, status: int, error: str | None) -> None:
        if call.tenant is not None:
            call.tenant.settle(call.reservation, call.prompt_tokens + call.completion_tokens)
        # Metric labels only for models that exist and the caller may use: a client cannot mint
        # label values (each one is a time series held in memory and rendered on every scrape).
        label = call.model if call.known_model else UNKNOWN_MODEL
        metrics.observe(label, status, call.prompt_tokens, call.completion_tokens, call.seconds)
        if call.first_token_seconds is not None:
            metrics.first_token.labels(label).observe(call.first_token_seconds)
        content = None
        if call.content is not None:
            content = call.content | ({"reply": call.reply} if call.reply is not None else {})
        server.request_log.record(
            RequestRecord(
                call.request_id,
                call.tenant.name if call.tenant else None,
                call.model[:200],
                call.prompt_tokens,
                call.completion_tokens,
                call.seconds * 1000,
                status,
                error,
                content,
            )
        )

    async def load(request: Request, name: str, path: str) -> dict:
        _require_admin(authenticate(request))
        problem = adapter_name_problem(name)
        if problem:
            raise APIError(400, problem, "invalid_adapter_name", "name")
        try:
            await asyncio.to_thread(server.load_adapter, name, path)
        except LorafleetError as err:
            raise APIError(400, str(err), "adapter_load_failed") from err
        return {"id": name, "object": "model", "loaded": True}

    async def unload(request: Request, name: str) -> dict:
        _require_admin(authenticate(request))
        try:
            await asyncio.to_thread(server.unload_adapter, name)
        except KeyError as err:
            raise APIError(404, f"adapter `{name}` is not loaded", "model_not_found") from err
        except LorafleetError as err:
            raise APIError(409, str(err), "adapter_busy") from err
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        problem = await server.backend.ready_problem()
        if problem is not None:
            return error_response(503, problem, "not_ready")
        return JSONResponse({"status": "ready", "adapters": server.adapters})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not server.options.public_metrics:
            authenticate(request)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        authenticate(request)
        return JSONResponse(app.openapi())

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        tenant = authenticate(request)
        models = [(name, None) for name in sorted(server.base_names)]
        models += [(name, server.base_name) for name in server.adapters if tenant is None or tenant.may_use(name)]
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "lorafleet", "parent": parent}
            for name, parent in models
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request, body: AdapterLoadRequest) -> dict:
        return await load(request, body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict:
        return await unload(request, name)

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request, body: VLLMLoadRequest) -> dict:
        return await load(request, body.lora_name, body.lora_path)

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request, body: VLLMLoadRequest) -> dict:
        return await unload(request, body.lora_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        # The body is read after the key is checked: an unauthenticated client learns nothing
        # about request validation and costs no parsing.
        call = Call(f"chatcmpl-{uuid.uuid4().hex[:24]}", UNKNOWN_MODEL, on_finish=record)
        try:
            call.tenant = authenticate(request)
            body = await _read_body(request, server.options.max_body_bytes)
            call.model = body.model
            adapter = resolve(call.tenant, body.model)
            call.known_model = True
            _check_rate(call.tenant)
            if server.options.log_content:
                call.content = {"messages": body.messages}
            call.on_start = lambda: _reserve_tokens(call, body)
            events = await server.backend.chat(body, adapter, call)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                sse = openai_format.server_sent_events(call, events, include_usage)
                return StreamingResponse(sse, media_type="text/event-stream")
            text, final = await openai_format.collect(events)
            call.completion_tokens = final.completion_tokens
            call.prompt_tokens = final.prompt_tokens or call.prompt_tokens
            call.reply = text
            if final.finish_reason == "error":
                raise APIError(500, f"generation failed: {final.error}", "engine_error")
            call.finish(200)
            return JSONResponse(openai_format.completion(call, text, final.finish_reason))
        except APIError as err:
            call.finish(err.status, err.message)
            raise

    return app


UNKNOWN_MODEL = "unknown"


async def _read_body(request: Request, limit: int) -> ChatCompletionRequest:
    """The request body, at most `limit` bytes, as a validated request (400 / 413 otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, "the request body is not valid JSON", "invalid_request") from err
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        raise APIError(400, message, "invalid_request", where or None) from err


def _reserve_tokens(call: Call, body: ChatCompletionRequest) -> None:
    """Hold the most this request can use against the tenant's tokens per minute before it runs
    (settled to what it really used when it ends), so a burst cannot overrun the limit."""
    tenant = call.tenant
    if tenant is None or tenant.tokens_per_minute is None:
        return
    most = call.prompt_tokens + (body.max_completion_tokens or body.max_tokens or call.max_tokens or 0)
    reservation, wait = tenant.reserve(most)
    if reservation is None:
        raise APIError(
            429,
            f"Token rate limit reached for tenant {tenant.name}; retry in {wait:.0f} s.",
            "rate_limit_exceeded",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    call.reservation = reservation


def _check_rate(tenant: Tenant | None) -> None:
    if tenant is None:
        return
    wait = tenant.retry_after()
    if wait is not None:
        raise APIError(
            429,
            f"Rate limit reached for tenant {tenant.name}; retry in {wait:.0f} s.",
            "rate_limit_exceeded",
            headers={"Retry-After": str(max(1, int(wait + 0.999)))},
        )
    tenant.record_request()


def _require_admin(tenant: Tenant | None) -> None:
    if tenant is not None and not tenant.admin:
        raise APIError(403, "This key may not load or unload adapters.", "permission_denied")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_request", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), None, None, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}", "internal_error")
