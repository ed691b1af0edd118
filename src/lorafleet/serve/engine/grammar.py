"""Grammar-constrained decoding: JSON mode, JSON Schema output and forced tool calls.

A request's constraint is compiled once, when it arrives (an invalid schema is the client's error,
a 400), into an llguidance grammar. The engine gives each constrained row its own matcher: before
every step the matcher fills the row's bitmask of the tokens it may take next, the device applies
it to the logits (`device_sampling.allowed_tokens`), and the token chosen is fed back. Rows without
a grammar in the same batch are untouched; a step with no constrained row carries no mask at all.

JSON is written as Python's `json.dumps` writes it (", " and ": ", no other whitespace): what chat
templates render with `tojson`, so models see their own format, and a small model cannot wander
off into whitespace. Every number is bounded (`bounded_numbers`): no reply holds a literal that a
JSON reader turns into infinity.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import torch

from lorafleet.errors import LorafleetError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Qwen2.5 / InternVL3 (and Hermes) tool-call format, as their chat templates describe it.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarError(LorafleetError):
    """A response format or tool list that cannot be compiled into a grammar."""


class Grammars:
    """Compiles constraints for one tokenizer; `matcher` starts one row's."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        # The model's vocabulary may be wider than the tokenizer's (padded embeddings): those
        # extra ids are never allowed under a grammar.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def json_schema(self, schema: dict | None) -> str:
        """Output that is one JSON value valid under `schema`; None: any JSON object (JSON mode)."""
        if schema is not None and not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        schema = bounded_numbers(schema or {"type": "object"})
        return self.check(llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_STYLE))

    def tool_calls(self, tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
        """Output that is tool calls and nothing else: one (or, with `parallel`, one or more)
        `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, the arguments
        valid under the function's parameter schema; `only`: that function."""
        calls = []
        for tool in tools:
            function = tool["function"]
            if only is not None and function["name"] != only:
                continue
            parameters = function.get("parameters") or {"type": "object"}
            calls.append({
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            })  # fmt: skip
        if not calls:
            raise GrammarError(f"tool_choice names the function {only!r}, which is not among the tools")
        schema = bounded_numbers({"anyOf": calls} if len(calls) > 1 else calls[0])
        schema["x-guidance"] = JSON_STYLE
        call = f'"{TOOL_CALL_OPEN}\\n" body "\\n{TOOL_CALL_CLOSE}"'
        start = 'call ("\\n" call)*' if parallel else "call"
        lark = f"start: {start}\ncall: {call}\nbody: %json {json.dumps(schema)}\n"
        return self.check(llguidance.LLMatcher.grammar_from_lark(lark))

    def check(self, grammar: str) -> str:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if failed:
            raise GrammarError(f"the schema cannot be used for constrained decoding: {messages[0]}")
        return grammar

    def matcher(self, grammar: str) -> RowGrammar:
        return RowGrammar(llguidance.LLMatcher(self._tokenizer, grammar), self.vocab_size)


class RowGrammar:
    """One row's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.words = (vocab_size + 31) // 32

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the row's allowed next tokens into `bitmask[row]` (int32 words, on the host)."""
        self._matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), self.words * 4)

    def accept(self, token: int) -> bool:
        """Feed the chosen token; False if the grammar refuses it (it never should: it was masked)."""
        return self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the reply ends here)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


# llguidance spells a number the schema leaves unbounded as -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
# and has no option that limits its digits or exponent (its JSON options are separators,
# whitespace, escapes, oneOf coercion and leniency), so a random model writes 1.19E391919891919198,
# which a JSON reader turns into infinity. A number with both bounds it spells as a range, digit by
# digit and without an exponent. So every number gets both bounds, a missing one at ±(2**53 - 1):
# the range RFC 7493 (I-JSON) says every reader holds exactly (llguidance cannot spell a range near
# a double's largest, 1.8e308). Values a schema leaves open (JSON mode, `{}`, extra object keys,
# array items) are one bounded JSON value, defined once in `$defs`.
NUMBER_LIMIT = 2**53 - 1
_OPEN_VALUE = "lorafleet-bounded-value"
_OPEN_REF = {"$ref": f"#/$defs/{_OPEN_VALUE}"}
_BOUNDS = {"minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT}
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
# Keywords whose schemas say what values may be (never `not` or `if`: bounding those would widen).
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "contains", "then", "else", "unevaluatedProperties",
            "unevaluatedItems")  # fmt: skip


def bounded_numbers(schema: dict) -> dict:
    """`schema` (a copy) with every number it allows within ±NUMBER_LIMIT (a bound the schema sets
    is kept, and a range it puts wholly beyond the limit keeps its open side)."""
    try:
        bounded = _bound(schema, open_values=True)
    except RecursionError:
        raise GrammarError("the JSON schema nests too deeply to be used for constrained decoding") from None
    definitions = bounded.get("$defs")
    definitions = definitions if isinstance(definitions, dict) else {}  # a malformed one is llguidance's to refuse
    open_value = _BOUNDS | {"additionalProperties": _OPEN_REF, "items": _OPEN_REF}
    return bounded | {"$defs": definitions | {_OPEN_VALUE: open_value}}


def _bound(node: object, open_values: bool) -> object:
    """One schema node and those below it. `open_values`: the values it leaves open (extra keys,
    array items) become the bounded JSON value. Not below `allOf`, nor in the branches of a node
    that constrains them further: llguidance intersects those with their siblings, and the bounded
    value intersected with itself never ends; the node that holds them takes it instead."""
    if node is True:
        return dict(_OPEN_REF) if open_values else dict(_BOUNDS)
    if not isinstance(node, dict):
        return node
    keys = set(node)
    constrained = bool(keys - _ANNOTATIONS - {"anyOf", "oneOf", "allOf", "$defs", "definitions"})
    out = dict(node)
    # (A keyword of the wrong type is left as it is, for llguidance to refuse with its own message.)
    for key in keys.intersection(_SCHEMA_MAPS):
        definitions = key in ("$defs", "definitions")  # used wherever they are referred to
        if isinstance(node[key], dict):
            out[key] = {name: _bound(s, open_values or definitions) for name, s in node[key].items()}
    for key in keys.intersection(_SCHEMA_LISTS):
        branches_open = open_values and (key == "prefixItems" or (key != "allOf" and not constrained))
        if isinstance(node[key], list):
            out[key] = [_bound(s, branches_open) for s in node[key]]
    for key in keys.intersection(_SCHEMAS):
        below = node[key]
        out[key] = [_bound(s, open_values) for s in below] if isinstance(below, list) else _bound(below, open_values)
    types = _types(node.get("type"))
    given = bool(keys & {"$ref", "const", "enum"})  # values listed here, or defined where referred to
    union = bool(keys & {"anyOf", "oneOf"}) and not constrained  # its branches say everything
    if types & {"number", "integer"} or not (types or given or keys & {"anyOf", "oneOf", "allOf"}):
        _add_bounds(node, out)
    if open_values and ("object" in types or not (types or given or union)):
        out.setdefault("additionalProperties", _OPEN_REF)
    if open_values and ("array" in types or not (types or given or union)):
        out.setdefault("items", _OPEN_REF)
    return out


def _types(declared: object) -> set[str]:
    """The JSON types a node names (none: any type)."""
    declared = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
    return {t for t in declared if isinstance(t, str)}


def _add_bounds(node: dict, out: dict) -> None:
    low = node.get("minimum", node.get("exclusiveMinimum"))
    high = node.get("maximum", node.get("exclusiveMaximum"))
    if not all(isinstance(bound, int | float | None) for bound in (low, high)):
        return  # not numbers: llguidance refuses the schema
    if low is None and (high is None or high >= -NUMBER_LIMIT):
        out["minimum"] = -NUMBER_LIMIT
    if high is None and (low is None or low <= NUMBER_LIMIT):
        out["maximum"] = NUMBER_LIMIT


def bitmask_for(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask that allows every token to every row (rows without a grammar stay so)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
