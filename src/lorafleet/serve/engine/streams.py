"""What the engine hands out and keeps per request: reply events, the caller's stream, a waiting
request and a running row. The gateway reads `Event`s from any `EventSource` (the local engine's
`ReplyStream`, or a relay of an upstream server's stream), so these types are the seam between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lorafleet.data.encode import Example
from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.engine.text import IncrementalText

if TYPE_CHECKING:
    from lorafleet.serve.engine.grammar import RowGrammar


@dataclass
class Event:
    """A piece of a reply: new text, and on the last event the reason it ended and the usage."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # OpenAI's per-token entries ({"token", "logprob", "bytes", "top_logprobs"}) of the tokens
    # this event completes, when the request asked for logprobs
    logprobs: list[dict] | None = None
    tool_calls: list[dict] | None = None  # tool-call deltas an upstream server parsed itself (relayed)
    # the failure is the request's own (its grammar cannot be followed within the server's limits):
    # a client error, never a server fault
    client_error: bool = False


class EventSource(Protocol):
    """A reply as it is generated: `ReplyStream` here, or a relay of another server's stream."""

    async def next_event(self) -> Event: ...

    def cancel(self) -> None: ...


class ReplyStream:
    """The caller's handle on a submitted request: iterate (or `await next_event()`) for its events.

    Given an event loop, events are handed to it thread-safely, so async handlers never block a
    thread waiting for the engine.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._events: queue.Queue[Event] | asyncio.Queue[Event] = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = False
        # time.perf_counter() when the engine chose the first token (its text may be held back
        # until it is whole UTF-8): time to first token, for benchmarks and metrics
        self.first_token_at: float | None = None

    def put(self, event: Event) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def get(self, timeout: float | None = None) -> Event:
        return self._events.get(timeout=timeout)

    async def next_event(self) -> Event:
        return await self._events.get()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)  # identity: requests are compared as handles, never by content
class Request:
    """A submitted request waiting for a slot."""

    prompt: Example
    adapter: str | None
    params: SamplingParams
    stream: ReplyStream
    tenant: str | None = None  # whose request: admission takes tenants in turn (waiting.py)
    max_rows: int | None = None  # rows its tenant may hold at once (None: the engine's own cap)


@dataclass(eq=False)
class Row:
    """One running sequence of the batch."""

    request: Request
    text: IncrementalText
    seed: int  # of its sampling (32 bits)
    slot: int  # its KV-cache slot
    position: int  # position id of the next token
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, accounted, not yet fed to the model
    finish: str | None = None
    grammar: RowGrammar | None = None
    mask: Future | None = None  # its next grammar mask, being computed (`masks.MaskWorkers`)
    logprobs: list[dict] = field(default_factory=list)  # entries not yet sent


def send_quietly(stream: ReplyStream, event: Event) -> None:
    """Hand an error event to its stream. A stream that cannot take it (its reader's event loop has
    closed) has nobody left to tell: the failure stops here instead of failing other requests or
    the engine thread."""
    with contextlib.suppress(Exception):
        stream.put(event)
