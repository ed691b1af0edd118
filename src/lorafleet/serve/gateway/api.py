"""The OpenAI-compatible gateway in front of a `FleetServer`.

Routes: GET /v1/models and /v1/models/{id}, POST /v1/chat/completions and /v1/completions (JSON
or SSE streaming; `n` choices, logprobs, structured output, tools), POST /v1/adapters and DELETE
/v1/adapters/{name} (admin; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter work too),
GET /health, /ready, /metrics. The gateway authenticates, applies the tenant's adapters and
limits, and records every call; the backend generates. Every error is OpenAI's error object with
the matching status, and a bad request never disturbs the requests around it. A parameter of
OpenAI's API that is not supported is refused (400), never silently ignored. Every response
carries an `x-request-id` header (the client's own, when it sent a usable one).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from lorafleet import __version__
from lorafleet.config import adapter_name_problem
from lorafleet.errors import LorafleetError
from lorafleet.governance.audit import utc_time
from lorafleet.serve.gateway import openai_format
from lorafleet.serve.gateway.audit_trail import content_sha256
from lorafleet.serve.gateway.calls import Call
from lorafleet.serve.gateway.errors import APIError, error_response
from lorafleet.serve.gateway.metrics import Metrics
from lorafleet.serve.gateway.request_log import RequestRecord
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.tenants import Tenant
from lorafleet.serve.gateway.tools import tool_use

MAX_CHOICES = 8  # `n` per request


class CompletionParameters(BaseModel):
    """What chat and text completions share."""

    # Clients send fields that change nothing here (user, metadata, store, service_tier, ...);
    # fields that would change the reply and are not supported are refused (`_refuse_unsupported`).
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict | None = None


class ChatCompletionRequest(CompletionParameters):
    messages: list[dict]
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def reply_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TextCompletionRequest(CompletionParameters):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def reply_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs


# Parameters of OpenAI's API that would change the reply and that this server does not implement.
UNSUPPORTED = {
    "functions": "use `tools`", "function_call": "use `tool_choice`", "audio": "text replies only",
    "prediction": "predicted outputs are not supported", "web_search_options": "no web search here",
}  # fmt: skip
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class AdapterLoadRequest(BaseModel):
    name: str  # checked by config.adapter_name_problem, as in fleet specs
    path: str


class VLLMLoadRequest(BaseModel):
    lora_name: str
    lora_path: str = ""


def create_app(server: FleetServer) -> FastAPI:
    # No /docs or /redoc pages (they fetch /openapi.json without a key); /openapi.json needs one.
    app = FastAPI(title="lorafleet", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestIdMiddleware)
    metrics = Metrics(server.backend.running, lambda: server.audit.failures)
    _install_error_handlers(app)
    fingerprint = f"lorafleet-{__version__}-{server.fingerprint}"

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
            content = call.content | ({"reply": call.replies[0]} if call.replies else {})
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
        server.audit.record("serve.request", _audit_entry(call, status, error, content, server.adapter_ids))

    async def load(request: Request, name: str, path: str) -> dict:
        tenant = authenticate(request)
        _require_admin(tenant)
        problem = adapter_name_problem(name)
        if problem:
            raise APIError(400, problem, "invalid_adapter_name", "name")
        try:
            await asyncio.to_thread(server.load_adapter, name, path)
        except LorafleetError as err:
            raise APIError(400, str(err), "adapter_load_failed") from err
        loaded = {"adapter": name, "path": path, "adapter_id": server.adapter_ids.get(name)}
        server.audit.record("serve.adapter_load", loaded | _who(tenant))
        return {"id": name, "object": "model", "loaded": True}

    async def unload(request: Request, name: str) -> dict:
        tenant = authenticate(request)
        _require_admin(tenant)
        unloaded = {"adapter": name, "adapter_id": server.adapter_ids.get(name)}
        try:
            await asyncio.to_thread(server.unload_adapter, name)
        except KeyError as err:
            raise APIError(404, f"adapter `{name}` is not loaded", "model_not_found") from err
        except LorafleetError as err:
            raise APIError(409, str(err), "adapter_busy") from err
        server.audit.record("serve.adapter_unload", unloaded | _who(tenant))
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

    def visible_models(tenant: Tenant | None) -> list[dict]:
        models = [(name, None) for name in sorted(server.base_names)]
        models += [(name, server.base_name) for name in server.adapters if tenant is None or tenant.may_use(name)]
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "lorafleet", "parent": parent}
            for name, parent in models
        ]

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        return {"object": "list", "data": visible_models(authenticate(request))}

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> dict:
        found = [model for model in visible_models(authenticate(request)) if model["id"] == name]
        if not found:
            raise APIError(
                404, f"The model `{name}` does not exist or you do not have access to it.", "model_not_found", "model"
            )
        return found[0]

    @app.post("/v1/adapters")
    async def load_adapter(request: Request, body: AdapterLoadRequest) -> dict:
        return await load(request, body.name, body.path)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict:
        return await unload(request, name)

    @app.post("/v1/keys/reload")
    async def reload_keys(request: Request) -> dict:
        tenant = authenticate(request)
        _require_admin(tenant)
        try:
            described = await asyncio.to_thread(server.reload_keys, _who(tenant))
        except LorafleetError as err:
            raise APIError(400, str(err), "keys_reload_failed") from err
        return {"object": "keys", "sha256": described["sha256"], "tenants": sorted(described["tenants"])}

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request, body: VLLMLoadRequest) -> dict:
        return await load(request, body.lora_name, body.lora_path)

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request, body: VLLMLoadRequest) -> dict:
        return await unload(request, body.lora_name)

    async def complete(request: Request, chat: bool) -> Response:
        # The body is read after the key is checked: an unauthenticated client learns nothing
        # about request validation and costs no parsing.
        prefix = "chatcmpl" if chat else "cmpl"
        call = Call(f"{prefix}-{uuid.uuid4().hex[:24]}", UNKNOWN_MODEL, on_finish=record, fingerprint=fingerprint)
        try:
            call.tenant = authenticate(request)
            model = ChatCompletionRequest if chat else TextCompletionRequest
            body = await _read_body(request, server.options.max_body_bytes, model)
            call.model = body.model
            call.input_sha256 = content_sha256(body.messages if chat else body.prompt)
            adapter = resolve(call.tenant, body.model)
            call.known_model = True
            _refuse_unsupported(body)
            _check_rate(call.tenant)
            if server.options.log_content:
                call.content = {"messages": body.messages} if chat else {"prompt": body.prompt}
            call.on_start = lambda: _reserve_tokens(call)
            if chat:
                tools = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls)
                shape = openai_format.ReplyShape(False, tools, body.logprobs is True)
                sources = await server.backend.chat(body, adapter, call, tools)
            else:
                shape = openai_format.ReplyShape(True, None, body.logprobs is not None)
                sources = await server.backend.complete(body, adapter, call)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                sse = openai_format.server_sent_events(call, sources, shape, include_usage)
                return StreamingResponse(sse, media_type="text/event-stream")
            choices, error = await openai_format.collect(call, sources, shape)
            if error is not None:
                raise APIError(500, f"generation failed: {error}", "engine_error")
            call.finish(200)
            return JSONResponse(openai_format.completion(call, choices))
        except APIError as err:
            call.finish(err.status, err.message)
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


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


def _refuse_unsupported(body: CompletionParameters) -> None:
    """A parameter that would change the reply and is not implemented: 400, never a silent 200."""
    extra = body.model_extra or {}
    for name, advice in UNSUPPORTED.items():
        if extra.get(name) is not None:
            raise APIError(400, f"`{name}` is not supported: {advice}", "unsupported_parameter", name)
    if extra.get("modalities") not in (None, ["text"]):
        raise APIError(400, "only text output is supported (`modalities: ['text']`)", "unsupported_value", "modalities")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"`{name}` is not supported (only 0)", "unsupported_value", name)
    if body.logit_bias:
        raise APIError(400, "`logit_bias` is not supported", "unsupported_parameter", "logit_bias")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`", "invalid_request", "top_logprobs")
        kind = (body.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                           "unsupported_value", "response_format")  # fmt: skip
        if kind != "text" and body.tools and body.tool_choice != "none":
            raise APIError(400, "response_format together with tools is not supported; send one of them",
                           "unsupported_value", "response_format")  # fmt: skip
    else:
        if body.echo:
            raise APIError(400, "`echo` is not supported (prompt logprobs are not computed)", "unsupported_value",
                           "echo")  # fmt: skip
        if body.suffix:
            raise APIError(400, "`suffix` (fill-in-the-middle) is not supported", "unsupported_parameter", "suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "`best_of` other than `n` is not supported", "unsupported_value", "best_of")


UNKNOWN_MODEL = "unknown"


async def _read_body(request: Request, limit: int, model: type[CompletionParameters]) -> CompletionParameters:
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
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        raise APIError(400, message, "invalid_request", where or None) from err


def _reserve_tokens(call: Call) -> None:
    """Hold the most this request can use against the tenant's tokens per minute before it runs
    (settled to what it really used when it ends), so a burst cannot overrun the limit. The backend
    has set the prompt's tokens and the replies' cap (every choice's) by then."""
    tenant = call.tenant
    if tenant is None or tenant.tokens_per_minute is None:
        return
    most = call.prompt_tokens + (call.max_tokens or 0)
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


def _who(tenant: Tenant | None) -> dict:
    return {"tenant": tenant.name if tenant else None, "key_id": tenant.key_id if tenant else None}


def _audit_entry(call: Call, status: int, error: str | None, content: dict | None, ids: dict) -> dict:
    """A request as the audit log records it (serve/gateway/audit_trail.py says what each field is)."""
    adapter = call.model if call.known_model and call.model in ids else None
    entry = _who(call.tenant) | {
        "request_id": call.request_id,
        "started": utc_time(time.time() - call.seconds),
        "model": call.model[:200],
        "adapter": adapter,
        "adapter_id": ids.get(adapter) if adapter else None,
        "input_sha256": call.input_sha256,
        "output_sha256": content_sha256(call.replies) if call.replies is not None else None,
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "status": status,
        "error": error,
        "latency_ms": round(call.seconds * 1000, 3),
    }
    return entry | ({"content": content} if content is not None else {})


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
