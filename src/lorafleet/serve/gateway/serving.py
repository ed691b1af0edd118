"""Chat and text completions from the request's first byte to its last, in the order that keeps
a bad or greedy request cheap: who asks (access), its turn among the tenant's own requests in
flight (admission), what they ask (protocol: read, validated, held to the request limits and
refused when unsupported, only after the key is checked), what it will take (the backend prepares
it on its bounded pool, the tenant holding at most half of it: prompt rendered and counted,
nothing generating), whether the tenant's limits hold it (every prompt's and every choice's
tokens reserved), then generation (the backend submits it, tagged with the tenant for the
engine's fair admission) shaped as one JSON reply or a stream. Every call, refused or answered,
is recorded once when it ends (accounting).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import Request

from lorafleet import __version__
from lorafleet.serve.gateway import openai_format
from lorafleet.serve.gateway.access import Access, check_rate, reserve_tokens
from lorafleet.serve.gateway.accounting import UNKNOWN_MODEL, Recorder
from lorafleet.serve.gateway.admission import TenantLimiter
from lorafleet.serve.gateway.audit_trail import content_sha256
from lorafleet.serve.gateway.calls import Call, PreparedRequest
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.protocol import (
    ChatCompletionRequest,
    CompletionParameters,
    read_body,
    refuse_invalid_text,
    refuse_over_limits,
    refuse_unsupported,
)
from lorafleet.serve.gateway.server import FleetServer
from lorafleet.serve.gateway.tools import tool_use

_log = logging.getLogger(__name__)


class Completions:
    """Serves POST /v1/chat/completions and /v1/completions."""

    def __init__(self, server: FleetServer, access: Access, recorder: Recorder) -> None:
        self.server, self.access, self.recorder = server, access, recorder
        self.fingerprint = f"lorafleet-{__version__}-{server.fingerprint}"
        options = server.options
        self.in_flight = TenantLimiter(options.max_tenant_requests, options.max_tenant_waiting)
        # With keys, one tenant prepares on half the threads at most, so another always finds some
        # free; without, every caller is the same tenant and there is nobody to keep threads for.
        shared = options.prepare_threads // 2 if options.keyed else options.prepare_threads
        self.preparing = TenantLimiter(max(1, shared), stage="requests being prepared")

    async def create(self, request: Request, kind: type[CompletionParameters]) -> dict | AsyncIterator[str]:
        """The whole reply (OpenAI's JSON), or its SSE lines when the client asked for a stream;
        APIError for a request refused or failed before its first byte of reply."""
        prefix = "chatcmpl" if kind is ChatCompletionRequest else "cmpl"
        call = Call(f"{prefix}-{uuid.uuid4().hex[:24]}", UNKNOWN_MODEL, fingerprint=self.fingerprint)
        leave = None  # gives back the tenant's place in flight; a stream gives it back when it ends
        try:
            # The body is read after the key is checked: an unauthenticated client learns nothing
            # about request validation and costs no parsing.
            call.tenant = self.access.authenticate(request)
            tenant = call.tenant.name if call.tenant else None
            leave = await self.in_flight.enter(tenant)  # waits behind the tenant's own requests only
            options = self.server.options
            body = await read_body(request, options.max_body_bytes, kind, options.limits.max_json_depth)
            adapter = self._accept(call, body)
            async with self.preparing.hold(tenant):  # the grammar's compile too: one tenant's at a time
                prepared, shape = await self._prepare(body, adapter, tenant or "")
            self._admit(call, prepared)
            sources = await self.server.backend.submit(prepared, tenant, call.tenant.max_rows if call.tenant else None)
            if body.stream:
                chunks = openai_format.server_sent_events(call, sources, shape, body.include_usage)
                stream = self._stream(call, chunks, leave)
                leave = None  # the stream gives the place back when it ends
                return stream
            choices, error = await openai_format.collect(call, sources, shape)
            if error is not None:  # the request's own fault (its grammar) is a 400, never a 500
                status, code = (400, "invalid_request") if error.client_error else (500, "engine_error")
                raise APIError(status, f"generation failed: {error.error}", code)
            call.finish(200)
            await self.recorder.record(call)
            return openai_format.completion(call, choices)
        except APIError as err:
            call.finish(err.status, err.message)
            await self.recorder.record(call)
            raise
        except Exception as err:  # a fault of ours: recorded like any other ending, never only on stderr
            _log.exception("request %s failed", call.request_id)
            call.finish(500, f"internal error: {type(err).__name__}: {err}"[:500])
            await self.recorder.record(call)
            raise APIError(500, f"internal error: {type(err).__name__}", "internal_error") from err
        finally:
            if leave is not None:
                leave()

    def _accept(self, call: Call, body: CompletionParameters) -> str | None:
        """The model the caller may use (its adapter; None: the base), within the request rate,
        asking only for what this server does and within its limits; what the call records of the
        request."""
        chat = isinstance(body, ChatCompletionRequest)
        call.model = body.model
        call.input_sha256 = content_sha256(body.messages if chat else body.prompt)
        adapter = self.access.resolve(call.tenant, body.model)
        call.known_model = True
        refuse_unsupported(body)
        refuse_over_limits(body, self.server.options.limits)
        refuse_invalid_text(body)
        check_rate(self.server.state, call.tenant)
        if self.server.options.log_content:
            call.content = {"messages": body.messages} if chat else {"prompt": body.prompt}
        return adapter

    async def _prepare(
        self, body: CompletionParameters, adapter: str | None, tenant: str
    ) -> tuple[PreparedRequest, openai_format.ReplyShape]:
        """The backend's prepared request, and the shape its reply takes."""
        backend = self.server.backend
        if isinstance(body, ChatCompletionRequest):
            tools = tool_use(body.tools, body.tool_choice, body.parallel_tool_calls)
            shape = openai_format.ReplyShape(False, tools, body.logprobs is True)
            return await backend.prepare_chat(body, adapter, tools, tenant), shape
        shape = openai_format.ReplyShape(True, None, body.logprobs is not None)
        return await backend.prepare_completion(body, adapter), shape

    def _admit(self, call: Call, prepared: PreparedRequest) -> None:
        """Hold the most the prepared request can use against the tenant's limits (429 when they
        cannot), before the backend starts it."""
        call.reservation = reserve_tokens(self.server.state, call.tenant, prepared.most_tokens)
        call.prompt_tokens = sum(prepared.prompt_tokens)  # each prompt counted once, as OpenAI does

    async def _stream(
        self, call: Call, chunks: AsyncGenerator[str, None], leave: Callable[[], None]
    ) -> AsyncIterator[str]:
        """The reply's chunks, then [DONE] once the call is recorded: a client that hangs up on
        [DONE] must not beat the log. A client that leaves early ends the chunks (which cancels
        its generation), and the call is recorded as it ended; either way the tenant's place in
        flight is given back (`leave`)."""
        try:
            async for piece in chunks:
                yield piece
        finally:
            leave()
            await chunks.aclose()
            await self.recorder.record(call)
        yield openai_format.DONE
