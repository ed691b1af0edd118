"""Tool calling as OpenAI's API has it, through the model's own chat template.

The request's `tools` go to the chat template (Qwen2.5 and InternVL3 list them in the system
turn); the model answers a call as a `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
block, which becomes a `tool_calls` entry of the reply (arguments as a JSON string, as OpenAI
sends them) with finish_reason "tool_calls". `tool_choice` "required" or a named function force
the call by grammar (`serve/engine/grammar.py`); "auto" lets the model choose; "none" offers no
tools. A stream holds back text from the first `<tool_call>` on and sends the calls at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lorafleet.serve.engine.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from lorafleet.serve.gateway.errors import APIError

_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolUse:
    """What the request asks of tools: `choice` is "auto", "required" or a function's name
    (no ToolUse at all: no tools, or tool_choice "none")."""

    tools: list[dict]
    choice: str
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @property
    def only(self) -> str | None:
        return None if self.choice in ("auto", "required") else self.choice


def tool_use(tools: list | None, tool_choice: object, parallel_tool_calls: bool | None) -> ToolUse | None:
    """The request's tools, checked (400 on a malformed one), or None when none are offered."""
    if tool_choice not in (None, "none", "auto", "required") and not _names_a_function(tool_choice):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or a function", "invalid_request",
                       "tool_choice")  # fmt: skip
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "invalid_request", "tool_choice")
        return None
    names = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}",
                           "invalid_request", f"tools[{index}]")  # fmt: skip
        if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", function["name"]):
            raise APIError(400, f"tools[{index}].function.name must be 1-64 letters, digits, '_', '-', '.' or ':'",
                           "invalid_request", f"tools[{index}].function.name")  # fmt: skip
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise APIError(400, f"tools[{index}].function.parameters must be a JSON schema object",
                           "invalid_request", f"tools[{index}].function.parameters")  # fmt: skip
        names.append(function["name"])
    if tool_choice == "none":
        return None
    choice = tool_choice["function"]["name"] if _names_a_function(tool_choice) else (tool_choice or "auto")
    if choice not in ("auto", "required") and choice not in names:
        raise APIError(400, f"tool_choice names {choice!r}, which is not among the tools", "invalid_request",
                       "tool_choice")  # fmt: skip
    # A named function is one call of it; otherwise as many as the model makes, unless told one.
    return ToolUse(tools, choice, parallel_tool_calls is not False and choice in ("auto", "required"))


def _names_a_function(choice: object) -> bool:
    return (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    )


def split_tool_calls(text: str, truncated: bool = False) -> tuple[str | None, list[dict]]:
    """A reply's content (None when there is none) and its tool calls in OpenAI's form. A block
    that is not a valid call leaves the whole reply as plain content: nothing is half-parsed.

    `truncated`: the reply was cut off (finish_reason "length"). What OpenAI returns for a call
    cut off by max_tokens, as its users report it and as vLLM and NVIDIA Dynamo changed their
    servers to match: finish_reason "length", `content` null, and the call it was writing as a
    `tool_calls` entry whose `arguments` stop where the reply stopped (so they are not valid
    JSON), in a stream as tool-call deltas. Here too (a stream sends each call as one delta at
    the end, as it does whole calls): a block left open becomes such a call once its function's
    name is complete (before that there is no call), and no piece of the markup, nor a
    `<tool_call>` cut off in its first characters, reaches the content."""
    cut = _unfinished_block(text) if truncated else len(text)
    head, tail = text[:cut], text[cut:]
    calls = []
    for block in _BLOCK.finditer(head):
        call = _parse_call(block.group(1))
        if call is None:
            return head, []
        calls.append(call)
    if tail and (call := _parse_cut_call(tail[len(TOOL_CALL_OPEN) :])) is not None:
        calls.append(call)
    if not calls and not tail:
        return text, []
    content = _BLOCK.sub("", head).strip()
    return content or None, calls


def _parse_call(body: str) -> dict | None:
    """A whole block's call in OpenAI's form (arguments as a JSON string), or None if it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return _call(call["name"], _arguments_text(call.get("arguments", {})))


# The start of a call as the grammar writes it (and models do): its name, then its arguments.
_CUT_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(.*)', re.DOTALL)


def _parse_cut_call(body: str) -> dict | None:
    """The call a block cut off after `<tool_call>` was making: its name and the arguments written
    so far, as they were written (whole arguments, when only the block's end was cut, as a whole
    call gives them); None while the name is unfinished."""
    found = _CUT_CALL.match(body)
    if found is None:
        return None
    name, written = json.loads(found.group(1)), found.group(2)
    try:
        arguments, _ = json.JSONDecoder().raw_decode(written)
    except ValueError:
        return _call(name, written)
    return _call(name, _arguments_text(arguments))


def _arguments_text(arguments: object) -> str:
    """Arguments as OpenAI sends them: a JSON string (one the model wrote as a string is kept)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _call(name: str, arguments: str) -> dict:
    function = {"name": name, "arguments": arguments}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def _unfinished_block(text: str) -> int:
    """Where a block that was never closed begins (or the start of a `<tool_call>` cut off in its
    first characters); len(text) when there is none."""
    opening = text.rfind(TOOL_CALL_OPEN)
    if opening >= 0 and TOOL_CALL_CLOSE not in text[opening:]:
        return opening
    return len(text) - _partial_opening(text)


class ToolCallText:
    """A streamed reply's text with the tool calls held back: `add` returns the content that can
    be sent now (never a piece of a `<tool_call>` block, nor text that may be the start of one);
    `finish` returns the content still unsent and the calls."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.holding = False  # a call has begun: nothing more is sent until the end

    def add(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        opening = self.text.find(TOOL_CALL_OPEN, self.sent)
        if opening >= 0:
            self.holding, end = True, opening
        else:
            end = len(self.text) - _partial_opening(self.text)
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def finish(self, truncated: bool = False) -> tuple[str, list[dict]]:
        """`truncated`: the reply was cut off (see `split_tool_calls`). Every block is in the unsent
        text: sending stops before the first `<tool_call>`."""
        unsent = self.text[self.sent :]
        self.sent = len(self.text)
        content, calls = split_tool_calls(unsent, truncated)
        return content or "", calls


def _partial_opening(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of a `<tool_call>`."""
    for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-keep:]):
            return keep
    return 0
