"""OpenAI's chat-completion shapes, built in one place from a backend's events (the local
engine's, or an upstream's stream turned into the same events): the JSON reply, the SSE chunks of
a stream, the usage chunk and the in-stream error."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from lorafleet.serve.engine.engine import Event, EventSource
from lorafleet.serve.gateway.calls import Call


def completion(call: Call, text: str, finish_reason: str) -> dict:
    """The whole reply of a non-streaming request."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(call, "chat.completion", [choice]) | {"usage": call.usage()}


def chunk(call: Call, delta: dict, finish_reason: str | None) -> dict:
    return _envelope(call, "chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason}])


def usage_chunk(call: Call) -> dict:
    """The last chunk of a stream whose client asked for usage (`stream_options.include_usage`)."""
    return _envelope(call, "chat.completion.chunk", []) | {"usage": call.usage()}


def stream_error(message: str) -> dict:
    """An error after the stream has begun: the status line is already sent, so it is an event."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "engine_error"}}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def collect(stream: EventSource) -> tuple[str, Event]:
    """Every event of a reply: its text and the final event."""
    pieces = []
    while True:
        event = await stream.next_event()
        pieces.append(event.text)
        if event.finish_reason is not None:
            return "".join(pieces), event


async def server_sent_events(call: Call, stream: EventSource, include_usage: bool) -> AsyncIterator[str]:
    """A reply as SSE chunks: the role, each piece of text, the finish reason, the usage if asked,
    then [DONE]. The call is finished (logged, counted) before [DONE], and a client that hangs up
    cancels the request in the engine."""
    status, error, pieces = 200, None, []
    try:
        yield sse(chunk(call, {"role": "assistant", "content": ""}, None))
        while True:
            event = await stream.next_event()
            call.completion_tokens = event.completion_tokens
            call.prompt_tokens = event.prompt_tokens or call.prompt_tokens
            if event.finish_reason == "error":
                status, error = 500, event.error
                yield sse(stream_error(f"generation failed: {error}"))
                break
            if event.text:
                if call.first_token_seconds is None:
                    call.first_token_seconds = call.seconds
                if call.content is not None:  # --log-content
                    pieces.append(event.text)
                    call.reply = "".join(pieces)
                yield sse(chunk(call, {"content": event.text}, None))
            if event.finish_reason is not None:
                yield sse(chunk(call, {}, event.finish_reason))
                break
        if include_usage and status == 200:
            yield sse(usage_chunk(call))
        call.finish(status, error)  # before [DONE]: a client that hangs up on it must not beat the log
        yield sse("[DONE]")
    except asyncio.CancelledError:
        stream.cancel()  # the client went away: stop generating for it
        status, error = 499, "client closed the connection"
        raise
    finally:
        call.finish(status, error)


def _envelope(call: Call, kind: str, choices: list) -> dict:
    return {"id": call.request_id, "object": kind, "created": int(time.time()), "model": call.model, "choices": choices}
