"""The in-process backend: requests become prompts for lorafleet's own engine.

It turns an OpenAI chat request into a prompt (chat template, images tiled as in training),
submits it to the engine with its adapter and sampling settings, and shapes the engine's events
into OpenAI's JSON reply or its server-sent-event stream.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter
from lorafleet.data.encode import IGNORE_INDEX, Example, encode_prompt
from lorafleet.data.records import ChatRecord, parse_openai_messages
from lorafleet.errors import AdapterError, DataError
from lorafleet.models.loading import FrozenBase
from lorafleet.serve.calls import Call
from lorafleet.serve.engine import Engine, Event, ReplyStream
from lorafleet.serve.errors import APIError
from lorafleet.serve.images import ImagePolicy
from lorafleet.serve.sampling import SamplingParams

READY_TIMEOUT_S = 60.0
DEFAULT_MAX_TOKENS = 256


class LocalBackend:
    def __init__(
        self,
        base: FrozenBase,
        image_policy: ImagePolicy,
        max_image_pixels: int,
        max_batch: int,
        max_seq_len: int = 4096,
    ) -> None:
        self.base = base
        self.fleet = LoRAFleet(base.model, base.language_prefix)
        self.engine = Engine(base, self.fleet, max_batch=max_batch, max_seq_len=max_seq_len)
        self.image_policy = image_policy
        self.max_image_pixels = max_image_pixels

    # --- the fleet ------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return sorted(self.fleet.shapes)

    def load_adapter(self, name: str, path: Path) -> None:
        with self.engine.model_lock:
            if name in self.fleet.shapes:
                raise AdapterError(f"adapter {name!r} is already loaded")
            load_adapter(self.fleet, name, path)

    def unload_adapter(self, name: str) -> None:
        with self.engine.model_lock:
            if name not in self.fleet.shapes:
                raise KeyError(name)
            if name in self.engine.adapters_in_use():
                raise AdapterError(f"adapter {name!r} has requests in flight; retry when they finish")
            self.fleet.remove_adapter(name)

    def running(self) -> int:
        return self.engine.running

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()

    async def ready_problem(self) -> str | None:
        """None when a real one-token generation succeeds, else what went wrong."""
        ids = torch.tensor(self.base.tokenizer("ready?", add_special_tokens=False)["input_ids"])
        prompt = Example(ids, torch.full_like(ids, IGNORE_INDEX), None)
        stream = self.engine.submit(
            prompt, None, SamplingParams(max_tokens=1, temperature=0), asyncio.get_running_loop()
        )
        try:
            _, event = await asyncio.wait_for(_collect(stream), READY_TIMEOUT_S)
        except TimeoutError:
            return "the engine did not answer in time"
        return f"the engine failed: {event.error}" if event.finish_reason == "error" else None

    # --- chat completions -----------------------------------------------------------------

    async def chat(self, body, adapter: str | None, call: Call) -> Response:
        prompt = await asyncio.to_thread(self._encode, body.messages)
        params = self._sampling(body, prompt)
        call.prompt_tokens = prompt.num_tokens
        stream = self.engine.submit(prompt, adapter, params, asyncio.get_running_loop())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(call, stream, include_usage), media_type="text/event-stream")
        text, event = await _collect(stream)
        call.completion_tokens = event.completion_tokens
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", "engine_error")
        call.finish(200)
        message = {"role": "assistant", "content": text}
        return JSONResponse(
            {
                "id": call.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.model,
                "choices": [{"index": 0, "message": message, "finish_reason": event.finish_reason, "logprobs": None}],
                "usage": call.usage(),
            }
        )

    def _encode(self, messages: list[dict]) -> Example:
        try:
            parsed, images = parse_openai_messages(messages, "request", self.image_policy.resolve)
            for image in images:
                _check_pixels(image, self.max_image_pixels)
            return encode_prompt(ChatRecord(parsed, images, "request"), self.base)
        except DataError as err:
            raise APIError(400, str(err), "invalid_request", "messages") from err

    def _sampling(self, body, prompt: Example) -> SamplingParams:
        limit = self.engine.max_positions
        room = limit - prompt.num_tokens
        max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_TOKENS, max(room, 0))
        if room < 1 or max_tokens > room:
            raise APIError(
                400,
                f"the prompt has {prompt.num_tokens} tokens; with max_tokens {max_tokens} it exceeds "
                f"this server's {limit} tokens per request (the model's context, or --max-seq-len)",
                "context_length_exceeded",
                "messages",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(max_tokens, body.temperature, body.top_p, stop, body.seed)


def _check_pixels(image: bytes, limit: int) -> None:
    try:
        width, height = Image.open(io.BytesIO(image)).size  # reads the header only
    except OSError as err:
        raise DataError(f"request: an image could not be decoded ({err})") from err
    if width * height > limit:
        raise DataError(f"request: image of {width}x{height} pixels is over the limit of {limit} pixels")


async def _collect(stream: ReplyStream) -> tuple[str, Event]:
    pieces = []
    while True:
        event = await stream.next_event()
        pieces.append(event.text)
        if event.finish_reason is not None:
            return "".join(pieces), event


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _sse(call: Call, stream: ReplyStream, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None, **extra) -> str:
        return sse(
            {
                "id": call.request_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": call.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
        )

    status, error = 200, None
    try:
        yield chunk({"role": "assistant", "content": ""}, None)
        while True:
            event = await stream.next_event()
            call.completion_tokens = event.completion_tokens
            if event.finish_reason == "error":
                status, error = 500, event.error
                yield sse(
                    {
                        "error": {
                            "message": f"generation failed: {error}",
                            "type": "server_error",
                            "param": None,
                            "code": "engine_error",
                        }
                    }
                )
                break
            if event.text:
                if call.first_token_seconds is None:
                    call.first_token_seconds = call.seconds
                yield chunk({"content": event.text}, None)
            if event.finish_reason is not None:
                yield chunk({}, event.finish_reason)
                break
        if include_usage and status == 200:
            yield sse(
                {
                    "id": call.request_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": call.model,
                    "choices": [],
                    "usage": call.usage(),
                }
            )
        call.finish(status, error)  # before [DONE]: a client that hangs up on it must not beat the log
        yield sse("[DONE]")
    except asyncio.CancelledError:
        stream.cancel()  # the client went away: stop generating for it
        status, error = 499, "client closed the connection"
        raise
    finally:
        call.finish(status, error)
