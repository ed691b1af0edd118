"""What a client may send: OpenAI's request bodies as typed models, read within a size and a
nesting limit, held to the caps of `RequestLimits` (prompts, choices, stop strings, tools),
refused when they ask for what this server does not do, and turned into the engine's sampling
parameters by the request itself (`to_sampling_params`, as vLLM's requests do).

Clients send fields that change nothing here (user, metadata, store, service_tier, ...): they are
allowed. A field that would change the reply and is not supported is refused (400), never
silently ignored (`refuse_unsupported`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.gateway.errors import APIError

MAX_CHOICES = 8  # `n` per request
DEFAULT_MAX_TOKENS = 256  # a reply's cap when the client sets none (and the context has room)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for beyond its body's size (`ServeOptions.max_body_bytes`): past
    any of these it gets a 400 naming the limit, before its prompts are rendered or counted. One
    tenant's request must not take the service from the others, however valid it is otherwise."""

    max_prompts: int = 64  # prompts in one /v1/completions request
    max_choices: int = 128  # replies one request asks for: n x prompts
    max_stop: int = 4  # stop strings (OpenAI's own limit): each is searched for after every token
    max_stop_chars: int = 256  # characters in each stop string
    max_tools: int = 128  # tools in one chat request (OpenAI's own limit)
    max_json_depth: int = 64  # nesting of the body's arrays and objects


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
    def prompt_count(self) -> int:
        """One text, one list of token ids, or several of either."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return 1
        return len(self.prompt)

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


async def read_body(
    request: Request, limit: int, model: type[CompletionParameters], max_depth: int = RequestLimits.max_json_depth
) -> CompletionParameters:
    """The request body, at most `limit` bytes and nested at most `max_depth` deep, as a
    validated request (400 / 413 otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
    too_deep = APIError(400, f"the request body nests arrays and objects more than {max_depth} deep", "invalid_request")
    try:
        data = json.loads(raw)
    except RecursionError as err:  # deeper than Python's own stack allows, far past any limit
        raise too_deep from err
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, "the request body is not valid JSON", "invalid_request") from err
    if nested_deeper_than(data, max_depth):
        raise too_deep  # before validation, which walks the body by recursion
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        raise APIError(400, message, "invalid_request", where or None) from err


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether JSON `value` nests arrays and objects more than `limit` deep (the outermost counts
    1), walked without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def refuse_over_limits(body: CompletionParameters, limits: RequestLimits) -> None:
    """A request that asks for more than `limits` allow: 400 naming the limit and the flag that sets it."""
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > limits.max_stop:
        _over("stop", f"{len(stops)} stop strings; this server takes at most {limits.max_stop} (--max-stop)")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        longest = max(len(stop) for stop in stops)
        _over("stop", f"a stop string of {longest} characters; at most {limits.max_stop_chars} (--max-stop-chars)")
    prompts = body.prompt_count if isinstance(body, TextCompletionRequest) else 1
    if prompts > limits.max_prompts:
        _over("prompt", f"{prompts} prompts; this server takes at most {limits.max_prompts} per request "
              "(--max-prompts): send them in several requests")  # fmt: skip
    if prompts * body.n > limits.max_choices:
        _over("n", f"{prompts} prompt(s) x n = {body.n} asks for {prompts * body.n} replies; this server gives at "
              f"most {limits.max_choices} per request (--max-choices): send fewer prompts or a smaller n")  # fmt: skip
    if isinstance(body, ChatCompletionRequest) and body.tools:
        if len(body.tools) > limits.max_tools:  # their size is a grammar limit: GrammarLimits.max_tools_bytes
            _over("tools", f"{len(body.tools)} tools; this server takes at most {limits.max_tools} (--max-tools)")


# The fields whose text reaches the tokenizer, the chat template, the grammar compiler or the stop
# search; the model's name is checked by looking it up (a 404 for one that cannot exist).
TEXT_FIELDS = ("messages", "prompt", "stop", "tools", "tool_choice", "response_format")
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads pairs valid ones: what is left stands alone


def refuse_invalid_text(body: CompletionParameters) -> None:
    """A lone UTF-16 surrogate ("\\ud800": JSON can escape one, UTF-8 cannot hold it) anywhere in the
    text a request is made of: 400 naming the field, rather than a tokenizer's or compiler's failure."""
    for name in TEXT_FIELDS:
        if _holds_lone_surrogate(getattr(body, name, None)):
            raise APIError(400, f"{name}: holds a lone UTF-16 surrogate (such as \\ud800), which is not a character; "
                           "send valid Unicode", "invalid_request", name)  # fmt: skip


def _holds_lone_surrogate(value: object) -> bool:
    pending = [value]
    while pending:  # iterative: the body's depth is bounded, but no need to spend the stack on it
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def _over(param: str, problem: str) -> None:
    raise APIError(400, f"{param}: {problem}", "over_limit", param)


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
