"""OpenAI's completion shapes, built in one place from a backend's events (the local engine's, or
an upstream's stream turned into the same events): the JSON reply, the SSE chunks of a stream, the
usage chunk and the in-stream error — for chat completions and for the legacy text completions,
with one choice or `n`, tool calls split out of the text, and logprobs when asked for.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from lorafleet.serve.engine.streams import Event, EventSource
from lorafleet.serve.gateway.calls import Call
from lorafleet.serve.gateway.tools import ToolCallText, ToolUse, split_tool_calls


@dataclass(frozen=True)
class ReplyShape:
    """What the client asked the reply to look like."""

    text_completion: bool = False  # /v1/completions (else chat)
    tools: ToolUse | None = None
    logprobs: bool = False
    echo: str | None = None  # text completions: the prompt, sent before the reply


class Choice:
    """One choice of a reply, assembled from its events."""

    def __init__(self, index: int, shape: ReplyShape) -> None:
        self.index, self.shape = index, shape
        self.pieces: list[str] = [shape.echo] if shape.echo else []
        self.logprobs: list[dict] = []
        self.relayed_calls: dict[int, dict] = {}  # tool-call deltas an upstream already parsed
        self.tool_text = ToolCallText() if shape.tools is not None and not shape.text_completion else None
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, event: Event) -> list[dict]:
        """Take one event; returns the stream's choice objects it makes (possibly none)."""
        self.pieces.append(event.text)
        self.completion_tokens = event.completion_tokens or self.completion_tokens
        self.logprobs += event.logprobs or []
        for delta in event.tool_calls or []:
            self._merge_relayed(delta)
        text = self.tool_text.add(event.text) if self.tool_text is not None else event.text
        out = []
        if text or event.logprobs or event.tool_calls:
            out.append(self._piece(text, event.logprobs, event.tool_calls))
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            out += self._closing()
        return out

    def final(self) -> dict:
        """The choice of a whole (non-streamed) reply."""
        logprobs = self._logprobs(self.logprobs) if self.shape.logprobs else None
        if self.shape.text_completion:
            return {"index": self.index, "text": self.text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        truncated = self.finish_reason == "length"
        content, calls = split_tool_calls(self.text, truncated) if self.tool_text is not None else (self.text, [])
        calls += list(self.relayed_calls.values())
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls and self.finish_reason == "stop" else self.finish_reason
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def opening(self) -> dict | None:
        """The first chunk of a streamed chat choice (the role); text completions have none."""
        if self.shape.text_completion:
            return None
        first = {"index": self.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return first | {"logprobs": None}

    def _closing(self) -> list[dict]:
        out, finish = [], self.finish_reason
        if self.tool_text is not None:
            rest, calls = self.tool_text.finish(truncated=finish == "length")
            if rest:
                out.append(self._piece(rest, None, None))
            if calls:
                listed = [{"index": i, **call} for i, call in enumerate(calls)]
                out.append(self._piece("", None, listed))
                finish = "tool_calls" if finish == "stop" else finish
        if self.relayed_calls and finish == "stop":
            finish = "tool_calls"
        if self.shape.text_completion:
            return out + [{"index": self.index, "text": "", "logprobs": None, "finish_reason": finish}]
        return out + [{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": finish}]

    def _piece(self, text: str, logprobs: list[dict] | None, tool_calls: list[dict] | None) -> dict:
        scored = self._logprobs(logprobs) if self.shape.logprobs and logprobs else None
        if self.shape.text_completion:
            return {"index": self.index, "text": text, "logprobs": scored, "finish_reason": None}
        delta = {"content": text} if text else {}
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return {"index": self.index, "delta": delta, "logprobs": scored, "finish_reason": None}

    def _logprobs(self, entries: list[dict]) -> dict:
        if not self.shape.text_completion:
            return {"content": entries, "refusal": None}
        # The legacy layout: parallel lists, alternatives as {token: logprob}, offsets into the text.
        offsets, offset = [], len(self.shape.echo or "")
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def _merge_relayed(self, delta: dict) -> None:
        """An upstream's streamed tool-call delta: the first names the call, later ones add arguments."""
        index = delta.get("index", len(self.relayed_calls))
        call = self.relayed_calls.setdefault(
            index, {"id": delta.get("id"), "type": "function", "function": {"name": "", "arguments": ""}}
        )
        function = delta.get("function") or {}
        call["id"] = call["id"] or delta.get("id")
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def completion(call: Call, choices: list[Choice]) -> dict:
    """The whole reply of a non-streaming request."""
    kind = "text_completion" if choices[0].shape.text_completion else "chat.completion"
    return _envelope(call, kind, [choice.final() for choice in choices]) | {"usage": call.usage()}


def chunk(call: Call, kind: str, choices: list[dict]) -> dict:
    return _envelope(call, kind, choices)


def stream_error(message: str, client_error: bool = False) -> dict:
    """An error after the stream has begun: the status line is already sent, so it is an event."""
    kind, code = ("invalid_request_error", "invalid_request") if client_error else ("server_error", "engine_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


DONE = sse("[DONE]")  # a stream's last line


async def collect(call: Call, sources: list[EventSource], shape: ReplyShape) -> tuple[list[Choice], Event | None]:
    """Every event of every choice; returns the choices and the first error event, if any."""
    choices = [Choice(i, shape) for i in range(len(sources))]
    error = None
    for choice, source in zip(choices, sources, strict=True):
        while choice.finish_reason is None:
            event = await source.next_event()
            choice.add(event)
            _count(call, choices, event)
            if event.finish_reason == "error":
                error = error or event
    call.replies = [choice.text for choice in choices]
    return choices, error


async def server_sent_events(
    call: Call, sources: list[EventSource], shape: ReplyShape, include_usage: bool
) -> AsyncGenerator[str, None]:
    """A reply as SSE chunks: each choice's role, its pieces as they come (choices interleaved by
    `index`), its finish reason and the usage if asked; the caller sends [DONE] (`DONE`) once it
    has recorded the call. The call is finished when the chunks end, and a client that hangs up
    cancels every choice in the engine."""
    kind = "text_completion" if shape.text_completion else "chat.completion.chunk"
    choices = [Choice(i, shape) for i in range(len(sources))]
    status, error = 200, None
    try:
        for choice in choices:
            if (opening := choice.opening()) is not None:
                yield sse(chunk(call, kind, [opening]))
        async for index, event in _interleaved(sources):
            pieces = choices[index].add(event)
            _count(call, choices, event)
            if event.finish_reason == "error":
                status, error = 400 if event.client_error else 500, event.error
                yield sse(stream_error(f"generation failed: {error}", event.client_error))
                break
            if event.text and call.first_token_seconds is None:
                call.first_token_seconds = call.seconds
            for piece in pieces:
                yield sse(chunk(call, kind, [piece]))
        call.replies = [choice.text for choice in choices]
        if include_usage and status == 200:
            yield sse(_envelope(call, kind, []) | {"usage": call.usage()})
    except asyncio.CancelledError:
        for source in sources:
            source.cancel()  # the client went away: stop generating for it
        status, error = 499, "client closed the connection"
        raise
    finally:
        call.finish(status, error)


async def _interleaved(sources: list[EventSource]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from every source as the events come, until each has finished."""
    if len(sources) == 1:
        while True:
            event = await sources[0].next_event()
            yield 0, event
            if event.finish_reason is not None:
                return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, source: EventSource) -> None:
        while True:
            event = await source.next_event()
            await queue.put((index, event))
            if event.finish_reason is not None:
                return

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        finished = 0
        while finished < len(sources):
            index, event = await queue.get()
            yield index, event
            finished += event.finish_reason is not None
    finally:
        for task in tasks:
            task.cancel()


def _count(call: Call, choices: list[Choice], event: Event) -> None:
    # The prompts are counted when the request is prepared, all of them; an event carries its own
    # prompt's count, which only an upstream (that counts its own) has to give.
    call.prompt_tokens = call.prompt_tokens or event.prompt_tokens
    call.completion_tokens = sum(choice.completion_tokens for choice in choices)


def _envelope(call: Call, kind: str, choices: list) -> dict:
    return {
        "id": call.request_id,
        "object": kind,
        "created": int(time.time()),
        "model": call.model,
        "system_fingerprint": call.fingerprint,
        "choices": choices,
    }
