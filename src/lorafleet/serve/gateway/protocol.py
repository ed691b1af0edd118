"""What a client may send: OpenAI's request bodies as typed models, read within a size limit,
refused when they ask for what this server does not do, and turned into the engine's sampling
parameters by the request itself (`to_sampling_params`, as vLLM's requests do).

Clients send fields that change nothing here (user, metadata, store, service_tier, ...): they are
allowed. A field that would change the reply and is not supported is refused (400), never
silently ignored (`refuse_unsupported`).
"""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.gateway.errors import APIError

MAX_CHOICES = 8  # `n` per request
DEFAULT_MAX_TOKENS = 256  # a reply's cap when the client sets none (and the context has room)


class CompletionParameters(BaseModel):
    """What chat and text completions share."""

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

    @property
    def reply_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """Alternatives per token when logprobs are asked for, else None."""
        return None

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk only when the client asks for one."""
        return bool((self.stream_options or {}).get("include_usage"))

    def to_sampling_params(self, prompt_tokens: int, max_positions: int, grammar: str | None = None) -> SamplingParams:
        """The engine's sampling parameters for a prompt of `prompt_tokens` on an engine that holds
        `max_positions` per request: 400 when the prompt and the reply's cap do not fit."""
        room = max_positions - prompt_tokens
        max_tokens = self.reply_tokens or min(DEFAULT_MAX_TOKENS, max(room, 0))
        if room < 1 or max_tokens > room:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} it exceeds "
                f"this server's {max_positions} tokens per request (the model's context, or --max-seq-len)",
                "context_length_exceeded",
                "messages",
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens, self.temperature, self.top_p, stop, self.seed, grammar=grammar, logprobs=self.top_alternatives
        )


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
        return (self.top_logprobs or 0) if self.logprobs else None


class TextCompletionRequest(CompletionParameters):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs


class AdapterLoadRequest(BaseModel):
    name: str  # checked by config.adapter_name_problem, as in fleet specs
    path: str


class VLLMLoadRequest(BaseModel):
    lora_name: str
    lora_path: str = ""


# Parameters of OpenAI's API that would change the reply and that this server does not implement.
UNSUPPORTED = {
    "functions": "use `tools`", "function_call": "use `tool_choice`", "audio": "text replies only",
    "prediction": "predicted outputs are not supported", "web_search_options": "no web search here",
}  # fmt: skip


async def read_body(request: Request, limit: int, model: type[CompletionParameters]) -> CompletionParameters:
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


def refuse_unsupported(body: CompletionParameters) -> None:
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
        _refuse_unsupported_chat(body)
    else:
        _refuse_unsupported_text(body)


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs: true`", "invalid_request", "top_logprobs")
    kind = (body.response_format or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       "unsupported_value", "response_format")  # fmt: skip
    if kind != "text" and body.tools and body.tool_choice != "none":
        raise APIError(400, "response_format together with tools is not supported; send one of them",
                       "unsupported_value", "response_format")  # fmt: skip


def _refuse_unsupported_text(body: TextCompletionRequest) -> None:
    if body.echo:
        raise APIError(400, "`echo` is not supported (prompt logprobs are not computed)", "unsupported_value",
                       "echo")  # fmt: skip
    if body.suffix:
        raise APIError(400, "`suffix` (fill-in-the-middle) is not supported", "unsupported_parameter", "suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "`best_of` other than `n` is not supported", "unsupported_value", "best_of")
