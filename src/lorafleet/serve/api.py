"""The OpenAI-compatible HTTP API in front of a `FleetServer`.

Routes: GET /v1/models, POST /v1/chat/completions (JSON or SSE streaming), POST/DELETE
/v1/adapters (admin), GET /health, /ready, /metrics. Every error is OpenAI's error object with
the matching status; a bad request never disturbs the requests around it.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lorafleet.data.encode import IGNORE_INDEX, Example, encode_prompt
from lorafleet.data.records import ChatRecord, parse_openai_messages
from lorafleet.errors import DataError, LorafleetError
from lorafleet.serve.engine import Event
from lorafleet.serve.errors import APIError, error_response
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.request_log import RequestRecord
from lorafleet.serve.sampling import SamplingParams
from lorafleet.serve.server import FleetServer
from lorafleet.serve.tenants import Tenant

READY_TIMEOUT_S = 60.0


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
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    path: str


@dataclass
class Call:
    """One chat completion in flight, for accounting."""

    request_id: str
    tenant: Tenant | None
    model: str
    started: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


def create_app(server: FleetServer) -> FastAPI:
    app = FastAPI(title="lorafleet", version="1")
    metrics = Metrics(lambda: server.engine.running)
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

    def visible_models(tenant: Tenant | None) -> list[tuple[str, str | None]]:
        base_name = server.base_dir.name
        models = [(name, None) for name in sorted(server.base_names)]
        models += [(name, base_name) for name in server.adapters if tenant is None or tenant.may_use(name)]
        return models

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

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        prompt = _text_prompt(server, "ready?")
        stream = server.engine.submit(
            prompt, None, SamplingParams(max_tokens=1, temperature=0), asyncio.get_running_loop()
        )
        try:
            event = await asyncio.wait_for(_last_event(stream), READY_TIMEOUT_S)
        except TimeoutError:
            return error_response(503, "the engine did not answer in time", "not_ready")
        if event.finish_reason == "error":
            return error_response(503, f"the engine failed: {event.error}", "not_ready")
        return JSONResponse({"status": "ready", "adapters": server.adapters})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        tenant = authenticate(request)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "lorafleet", "parent": parent}
            for name, parent in visible_models(tenant)
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request, body: AdapterLoadRequest) -> dict:
        _require_admin(authenticate(request))
        try:
            await asyncio.to_thread(server.load_adapter, body.name, server.options.fleet_dir / body.path)
        except LorafleetError as err:
            raise APIError(400, str(err), "adapter_load_failed") from err
        return {"id": body.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict:
        _require_admin(authenticate(request))
        try:
            await asyncio.to_thread(server.unload_adapter, name)
        except KeyError as err:
            raise APIError(404, f"adapter `{name}` is not loaded", "model_not_found") from err
        except LorafleetError as err:
            raise APIError(409, str(err), "adapter_busy") from err
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        call = Call(f"chatcmpl-{uuid.uuid4().hex[:24]}", None, body.model, time.perf_counter())
        try:
            call.tenant = authenticate(request)
            _check_rate(call.tenant)
            adapter = resolve(call.tenant, body.model)
            prompt = await asyncio.to_thread(_encode, server, body.messages)
            params = _sampling(body, prompt, server.engine.max_positions)
        except APIError as err:
            _account(server, metrics, call, err.status, err.message)
            raise
        call.prompt_tokens = prompt.num_tokens
        stream = server.engine.submit(prompt, adapter, params, asyncio.get_running_loop())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(server, metrics, call, stream, include_usage), media_type="text/event-stream")
        text, event = await _collect(stream)
        call.completion_tokens = event.completion_tokens
        if event.finish_reason == "error":
            _account(server, metrics, call, 500, event.error)
            raise APIError(500, f"generation failed: {event.error}", "engine_error")
        _account(server, metrics, call, 200, None)
        return JSONResponse(
            {
                "id": call.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": event.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(call),
            }
        )

    return app


# --- request handling -------------------------------------------------------------------------


def _encode(server: FleetServer, messages: list[dict]) -> Example:
    policy = server.options.image_policy
    try:
        parsed, images = parse_openai_messages(messages, "request", policy.resolve)
        for image in images:
            _check_pixels(image, server.options.max_image_pixels)
        return encode_prompt(ChatRecord(parsed, images, "request"), server.base)
    except DataError as err:
        raise APIError(400, str(err), "invalid_request", "messages") from err


def _check_pixels(image: bytes, limit: int) -> None:
    try:
        width, height = Image.open(io.BytesIO(image)).size  # reads the header only
    except OSError as err:
        raise DataError(f"request: an image could not be decoded ({err})") from err
    if width * height > limit:
        raise DataError(f"request: image of {width}x{height} pixels is over the limit of {limit} pixels")


def _sampling(body: ChatCompletionRequest, prompt: Example, max_positions: int) -> SamplingParams:
    room = max_positions - prompt.num_tokens
    max_tokens = body.max_completion_tokens or body.max_tokens or min(256, max(room, 0))
    if room < 1 or max_tokens > room:
        raise APIError(
            400,
            f"the prompt has {prompt.num_tokens} tokens; with max_tokens {max_tokens} it exceeds "
            f"the model's context of {max_positions}",
            "context_length_exceeded",
            "messages",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens, body.temperature, body.top_p, stop, body.seed)


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


async def _collect(stream) -> tuple[str, Event]:
    pieces = []
    while True:
        event = await stream.next_event()
        pieces.append(event.text)
        if event.finish_reason is not None:
            return "".join(pieces), event


async def _last_event(stream) -> Event:
    return (await _collect(stream))[1]


async def _sse(server, metrics, call: Call, stream, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None) -> str:
        body = {
            "id": call.request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(body)}\n\n"

    status, error = 200, None
    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        first = True
        while True:
            event = await stream.next_event()
            if first and event.text:
                metrics.first_token.labels(call.model).observe(time.perf_counter() - call.started)
                first = False
            call.completion_tokens = event.completion_tokens
            if event.finish_reason == "error":
                status, error = 500, event.error
                failure = {
                    "error": {
                        "message": f"generation failed: {error}",
                        "type": "server_error",
                        "param": None,
                        "code": "engine_error",
                    }
                }
                yield f"data: {json.dumps(failure)}\n\n"
                break
            if event.text:
                yield chunk({"content": event.text}, None)
            if event.finish_reason is not None:
                yield chunk({}, event.finish_reason)
                break
        if include_usage and status == 200:
            usage = {
                "id": call.request_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": call.model,
                "choices": [],
                "usage": _usage(call),
            }
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        stream.cancel()  # the client went away: stop generating for it
        status, error = 499, "client closed the connection"
        raise
    finally:
        _account(server, metrics, call, status, error)


def _usage(call: Call) -> dict:
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
    }


def _account(server: FleetServer, metrics: Metrics, call: Call, status: int, error: str | None) -> None:
    seconds = time.perf_counter() - call.started
    if call.tenant is not None:
        call.tenant.record_tokens(call.prompt_tokens + call.completion_tokens)
    metrics.observe(call.model, status, call.prompt_tokens, call.completion_tokens, seconds)
    server.request_log.record(
        RequestRecord(
            call.request_id,
            call.tenant.name if call.tenant else None,
            call.model,
            call.prompt_tokens,
            call.completion_tokens,
            seconds * 1000,
            status,
            error,
        )
    )


def _require_admin(tenant: Tenant | None) -> None:
    if tenant is not None and not tenant.admin:
        raise APIError(403, "This key may not load or unload adapters.", "permission_denied")


def _text_prompt(server: FleetServer, text: str) -> Example:
    ids = torch.tensor(server.base.tokenizer(text, add_special_tokens=False)["input_ids"])
    return Example(ids, torch.full_like(ids, IGNORE_INDEX), None)


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
