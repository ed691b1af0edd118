"""The in-process backend: requests become prompts for lorafleet's own engine.

A request is prepared first: its prompt rendered (chat template, images tiled as in training),
counted and checked, its sampling parameters settled, nothing in the engine yet. Once the gateway
has admitted it, it is submitted: each choice becomes an engine request with its adapter and its
own seed, and the engine's events go back to the gateway to be shaped into OpenAI's reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter, training_settings
from lorafleet.data.encode import IGNORE_INDEX, Example, encode_prompt, render
from lorafleet.data.records import IMAGE_PLACEHOLDER, ChatRecord, parse_openai_messages
from lorafleet.errors import AdapterError, DataError
from lorafleet.models.loading import FrozenBase
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.grammar import CompiledGrammar, GrammarError, GrammarLimits, check_size
from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox
from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.engine.streams import ReplyStream
from lorafleet.serve.gateway.calls import PreparedRequest
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.images import ImagePolicy
from lorafleet.serve.gateway.protocol import ChatCompletionRequest, TextCompletionRequest
from lorafleet.serve.gateway.tools import ToolUse

READY_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class LocalRequest(PreparedRequest):
    """A request prepared for the engine: its prompts, adapter and sampling parameters."""

    prompts: tuple[Example, ...]
    adapter: str | None
    params: SamplingParams


class LocalBackend:
    def __init__(
        self,
        base: FrozenBase,
        image_policy: ImagePolicy,
        max_image_pixels: int,
        max_batch: int,
        max_seq_len: int = 4096,
        max_images: int = 8,
        max_tiles: int | None = None,
        grammar_limits: GrammarLimits | None = None,
        max_rows_per_tenant: int | None = None,
        prepare_threads: int = 8,
    ) -> None:
        self.base = base
        self.fleet = LoRAFleet(base.model, base.language_prefix)
        self.grammar_limits = grammar_limits or GrammarLimits()
        self.engine = Engine(
            base,
            self.fleet,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            grammar_limits=self.grammar_limits,
            max_rows_per_tenant=max_rows_per_tenant,
        )
        self._grammar_sandbox: GrammarSandbox | None = None
        # Image fetches and decoding, chat rendering and tokenising: blocking work, kept off the
        # event loop on a pool of its own, bounded (the gateway holds each tenant to half of it).
        self._preparing = ThreadPoolExecutor(prepare_threads, thread_name_prefix="lorafleet-prepare")
        self.image_policy = image_policy
        self.max_image_pixels = max_image_pixels
        self.max_images = max_images
        self.max_tiles = max_tiles  # every model's, when given
        self._max_tiles: dict[str, int | None] = {}  # each adapter's, from its training
        tokenizer = base.tokenizer
        specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
        }
        self._special_tokens = sorted((t for t in specials if t and len(t) > 1), key=len, reverse=True)

    # --- the fleet ------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return sorted(self.fleet.shapes)

    def load_adapter(self, name: str, path: Path) -> None:
        with self.engine.model_lock:
            if name in self.fleet.shapes:
                raise AdapterError(f"adapter {name!r} is already loaded")
            load_adapter(self.fleet, name, path)
            # Images are tiled as the adapter was trained (the same picture can be 3x the tokens
            # with another tiling); --max-tiles overrides for every model.
            self._max_tiles[name] = training_settings(path).get("max_tiles")

    def unload_adapter(self, name: str) -> None:
        with self.engine.model_lock:
            if name not in self.fleet.shapes:
                raise KeyError(name)
            if name in self.engine.adapters_in_use():
                raise AdapterError(f"adapter {name!r} has requests in flight; retry when they finish")
            self.fleet.remove_adapter(name)
            self._max_tiles.pop(name, None)

    def running(self) -> int:
        return self.engine.running

    def waiting(self) -> int:
        return self.engine.waiting

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()
        if self._grammar_sandbox is not None:
            self._grammar_sandbox.close()
        self._preparing.shutdown(wait=False, cancel_futures=True)

    async def grammar_sandbox(self) -> GrammarSandbox:
        """Where tenants' grammars compile, made with the first one (its worker processes start
        then too). Off the event loop: reading a 150k-token vocabulary into llguidance takes a second."""
        if self._grammar_sandbox is None:
            grammars = await asyncio.to_thread(lambda: self.engine.grammars)
            self._grammar_sandbox = self._grammar_sandbox or GrammarSandbox(grammars)
        return self._grammar_sandbox

    def alive(self) -> bool:
        return self.engine.alive

    async def ready_problem(self) -> str | None:
        """None when a real one-token generation succeeds, else what went wrong."""
        ids = torch.tensor(self.base.tokenizer("ready?", add_special_tokens=False)["input_ids"])
        prompt = Example(ids, torch.full_like(ids, IGNORE_INDEX), None)
        stream = self.engine.submit(
            prompt, None, SamplingParams(max_tokens=1, temperature=0), asyncio.get_running_loop()
        )
        try:
            event = await asyncio.wait_for(_last_event(stream), READY_TIMEOUT_S)
        except TimeoutError:
            return "the engine did not answer in time"
        return f"the engine failed: {event.error}" if event.finish_reason == "error" else None

    # --- completions: prepare (render, count, check), then submit ----------------------------

    async def prepare_chat(
        self, body: ChatCompletionRequest, adapter: str | None, tools: ToolUse | None, tenant: str = ""
    ) -> LocalRequest:
        """The chat's prompt rendered (images tiled), counted and checked, its grammar compiled (in
        the sandbox, cached for `tenant`): a 400 for what cannot run, and nothing in the engine yet."""
        self._check_schema_sizes(body.response_format, tools)  # before anything renders or compiles them
        prompt = await self._off_the_loop(self._encode, body.messages, adapter, tools)
        grammar = await self._grammar(body.response_format, tools, tenant)
        params = body.to_sampling_params(prompt.num_tokens, self.engine.max_positions, grammar)
        return _prepared((prompt,), body.n, adapter, params)

    async def prepare_completion(self, body: TextCompletionRequest, adapter: str | None) -> LocalRequest:
        """A text completion: each prompt as it is (no chat template), `n` choices of each."""
        prompts = await self._off_the_loop(self._raw_prompts, body.prompt)
        params = body.to_sampling_params(max(p.num_tokens for p in prompts), self.engine.max_positions)
        return _prepared(prompts, body.n, adapter, params)

    async def submit(
        self, request: LocalRequest, tenant: str | None = None, max_rows: int | None = None
    ) -> list[ReplyStream]:
        """n choices of every prompt, in OpenAI's order; each choice with its own seed (seed + i
        when the client gave one, so that a seeded request is reproducible), each tagged with the
        tenant, whose rows the engine admits in turn with other tenants'."""
        params = request.params
        base_seed = params.seed if params.seed is not None else secrets.randbits(32)
        loop = asyncio.get_running_loop()
        streams = []
        for prompt in request.prompts:
            for choice in range(request.choices):
                seeded = dataclasses.replace(params, seed=base_seed + choice)
                streams.append(self.engine.submit(prompt, request.adapter, seeded, loop, tenant, max_rows))
        return streams

    def _encode(self, messages: list[dict], adapter: str | None = None, tools: ToolUse | None = None) -> Example:
        try:
            _count_images(messages, self.max_images)
            parsed, images = parse_openai_messages(messages, "request", self.image_policy.resolve)
            self._refuse_special_tokens(parsed)
            for image in images:
                _check_pixels(image, self.max_image_pixels)
            tiles = self.max_tiles or self._max_tiles.get(adapter)
            record = ChatRecord(parsed, images, "request")
            if tools is not None:
                self._check_template_takes_tools(record, tools)
            return encode_prompt(record, self.base, tiles, tools.tools if tools else None)
        except DataError as err:
            raise APIError(400, str(err), "invalid_request", "messages") from err

    def _check_template_takes_tools(self, record: ChatRecord, tools: ToolUse) -> None:
        """A chat template that ignores `tools` would let the model answer blind: refuse instead."""
        messages = [{"role": m.role, "content": m.text} for m in record.messages if m.role != "tool"] or [
            {"role": "user", "content": ""}
        ]
        tokenizer = self.base.tokenizer
        if render(tokenizer, messages, True, tools.tools) == render(tokenizer, messages, True):
            raise APIError(
                400,
                f"the chat template of {self.base.path.name} does not describe tools, so the model cannot call "
                "them; serve a model whose template supports tools (Qwen2.5, InternVL3) or send no tools",
                "unsupported_parameter",
                "tools",
            )

    def _check_schema_sizes(self, response_format: dict | None, tools: ToolUse | None) -> None:
        """The tools and the response_format schema within their size and depth caps (else a 400
        naming the field), before anything renders or compiles them."""
        limits = self.grammar_limits
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        capped = (
            (tools.tools if tools else None, limits.max_tools_bytes, "tools", "tools"),
            (schema, limits.max_schema_bytes, "response_format.json_schema.schema", "response_format"),
        )
        for value, max_bytes, field, param in capped:
            try:
                if value is not None:
                    check_size(value, max_bytes, limits.max_schema_depth, field)
            except GrammarError as err:
                raise APIError(400, str(err), "invalid_request", param) from err

    async def _grammar(
        self, response_format: dict | None, tools: ToolUse | None, tenant: str
    ) -> CompiledGrammar | None:
        """The grammar the reply must follow (a JSON schema, JSON mode, or forced tool calls),
        compiled in the sandbox for `tenant`; None when the reply is free."""
        forced = tools is not None and tools.forced
        try:
            constraint = _constraint(response_format, tools if forced else None)
            if constraint is None:
                return None
            return await (await self.grammar_sandbox()).compile(tenant, *constraint)
        except GrammarError as err:
            raise APIError(400, str(err), "invalid_request", "tools" if forced else "response_format") from err

    async def _off_the_loop(self, work, *args):
        return await asyncio.get_running_loop().run_in_executor(self._preparing, work, *args)

    def _raw_prompts(self, prompt: str | list) -> tuple[Example, ...]:
        return tuple(self._raw_prompt(one) for one in _prompt_list(prompt))

    def _raw_prompt(self, prompt: str | list[int]) -> Example:
        if isinstance(prompt, str):
            ids = torch.tensor(self.base.tokenizer(prompt)["input_ids"], dtype=torch.long)
        else:
            if any(not 0 <= token < self.engine.vocab_size for token in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {self.engine.vocab_size})", "invalid_request",
                               "prompt")  # fmt: skip
            ids = torch.tensor(prompt, dtype=torch.long)
        if ids.numel() == 0:
            raise APIError(400, "the prompt is empty", "invalid_request", "prompt")
        return Example(ids, torch.full_like(ids, IGNORE_INDEX), None, "request")

    def _refuse_special_tokens(self, messages) -> None:
        """The model's own control strings typed into a message (role markers, image tokens) would
        be read as control tokens: a forged turn, or an image that is not there."""
        for index, message in enumerate(messages):
            text = message.text.replace(IMAGE_PLACEHOLDER, "")  # the parser's own, one per image part
            found = next((token for token in self._special_tokens if token in text), None)
            if found:
                raise DataError(f"request: messages[{index}] contains the model's special token {found!r}")


def _constraint(response_format: dict | None, forced_tools: ToolUse | None) -> tuple[str, dict, str] | None:
    """What the sandbox compiles for a request: (`grammar.grammar_text`'s kind and spec, how a
    refusal names it), or None when the reply is free."""
    if forced_tools is not None:
        spec = {"tools": forced_tools.tools, "only": forced_tools.only, "parallel": forced_tools.parallel}
        return "tool_calls", spec, "tools' schemas"
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return "json_schema", {"schema": None}, "JSON mode grammar"
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise GrammarError("response_format.json_schema must be {'name': ..., 'schema': {...}}")
    return "json_schema", {"schema": spec.get("schema") or {"type": "object"}}, "response_format schema"


def _prepared(prompts: tuple[Example, ...], n: int, adapter: str | None, params: SamplingParams) -> LocalRequest:
    counts = tuple(prompt.num_tokens for prompt in prompts)
    return LocalRequest(counts, n, params.max_tokens, prompts, adapter, params)


async def _last_event(stream: ReplyStream):
    while (event := await stream.next_event()).finish_reason is None:
        pass
    return event


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A text completion's prompts: one text, several texts, one list of token ids, or several."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "invalid_request", "prompt")
    return list(prompt)


def _count_images(messages: object, limit: int) -> None:
    """Refuse more than `limit` images before any is decoded or fetched."""
    parts = [part for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
             for part in m["content"]] if isinstance(messages, list) else []  # fmt: skip
    count = sum(1 for part in parts if isinstance(part, dict) and part.get("type") == "image_url")
    if count > limit:
        raise DataError(f"request: {count} images; this server takes at most {limit} per request")


def _check_pixels(image: bytes, limit: int) -> None:
    try:
        width, height = Image.open(io.BytesIO(image)).size  # reads the header only
    except (OSError, Image.DecompressionBombError, ValueError) as err:
        # PIL's messages name the in-memory file object (with its address): say it plainly instead
        raise DataError("request: an image could not be decoded (not a PNG, JPEG, GIF or WebP image?)") from err
    if width * height > limit:
        raise DataError(f"request: image of {width}x{height} pixels is over the limit of {limit} pixels")
