"""Grammar-constrained decoding: JSON mode, JSON Schema output and forced tool calls.

A request's constraint becomes an llguidance grammar (its text: `json_schema_grammar`,
`tool_calls_grammar`). The engine gives each constrained row its own matcher: before every step the
matcher computes the row's bitmask of the tokens it may take next (off the engine thread:
`masks.py`), the device applies it to the logits (`device_sampling.allowed_tokens`), and the token
chosen is fed back. Rows without a grammar in the same batch are untouched; a step with no
constrained row carries no mask at all.

A schema comes from a tenant, so it is compiled where it can be killed (`grammar_sandbox.py`, which
runs this module in a worker process: so this module never imports torch) and every cost it can
have is bounded by `GrammarLimits`: its size and depth, the compile's time and memory,
llguidance's own parser and lexer limits (which bound each later step too), and the time a step
waits for its mask. Trusted callers (evaluation, tests) compile in-process with `Grammars`.

JSON is written as Python's `json.dumps` writes it (", " and ": ", no other whitespace): what chat
templates render with `tojson`, so models see their own format, and a small model cannot wander
off into whitespace. Every number is bounded (`bounded_numbers`): no reply holds a literal that a
JSON reader turns into infinity.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import llguidance

from lorafleet.errors import LorafleetError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Qwen2.5 / InternVL3 (and Hermes) tool-call format, as their chat templates describe it.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarError(LorafleetError):
    """A response format or tool list that cannot be compiled into a grammar, or that a limit refuses."""


@dataclass(frozen=True)
class GrammarLimits:
    """What one request's grammar may cost the server (docs/security.md lists each with its flag)."""

    max_schema_bytes: int = 128 * 1024  # a response_format schema, as compact JSON
    max_tools_bytes: int = 128 * 1024  # all of a request's tools together, as compact JSON
    max_schema_depth: int = 32  # objects and arrays nested inside a schema (or the tools)
    compile_timeout_s: float = 10.0  # wall time of one compile in its worker, which is killed after it
    compile_memory_mb: int = 1024  # address space one compile may add to its worker
    compile_workers: int = 2  # worker processes, and compiles at once (one per tenant at a time)
    cached_per_tenant: int = 64  # compiled grammars (and refusals) kept per tenant, least recently used out
    # ... and their grammars' text together: a matcher holds ~300x its text (2,000 properties: 60 kB
    # of text, 17 MiB of matcher), so this bounds what one tenant's cache holds at ~75 MiB
    cache_bytes_per_tenant: int = 256 * 1024
    mask_budget_ms: float = 50.0  # the most a step waits for its rows' masks; a row later than this fails
    mask_threads: int = 2  # threads computing masks beside the engine thread
    # llguidance's own limits (`LLParserLimits`), set here so that its defaults changing cannot
    # widen them. They bound the compile and every later step: a step that would pass one leaves
    # the row's matcher in error, and the row fails alone.
    max_items_in_row: int = 2000  # Earley items in one row (its default)
    initial_lexer_fuel: int = 1_000_000  # work building the lexer's regexes, ~20 ms (its default)
    step_lexer_fuel: int = 200_000  # lexer work in one mask, ~15 ms (its default)
    step_max_items: int = 50_000  # Earley items in one step, ~3 ms (its default)
    max_lexer_states: int = 50_000  # ~1-2 kB each, built lazily as rows decode (its default: 250,000)
    max_grammar_size: int = 500_000  # symbols in the grammar's productions (its default)

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row,
            initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_size,
            verbose_errors=False,  # a message names the limit, never the parser's state
        )

    def to_dict(self) -> dict:
        return asdict(self)


def check_size(value: object, max_bytes: int, max_depth: int, what: str) -> None:
    """Refuse `value` (a schema, or a request's tools; `what` names its field) nested deeper than
    `max_depth` objects and arrays or larger than `max_bytes` as compact JSON, before anything
    renders or compiles it. Walked without recursion (a value nested thousands deep is refused,
    not a RecursionError) and only until a cap is passed: the work is bounded by the caps, not by
    the value, which may be most of a 32 MiB body."""
    too_big = GrammarError(f"{what}: over {max_bytes} bytes as JSON, the most this server takes; simplify it")
    size, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise GrammarError(f"{what}: nested deeper than {max_depth} levels, the most this server takes")
        size += 2 + max(len(node) - 1, 0)  # brackets and commas
        pairs = node.items() if isinstance(node, dict) else ((None, child) for child in node)
        for key, child in pairs:
            if size > max_bytes:
                raise too_big
            if key is not None:
                size += len(json.dumps(key)) + 1  # the key and its colon
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            else:
                size += len(json.dumps(child))
        if size > max_bytes:
            raise too_big


def json_schema_grammar(schema: dict | None) -> str:
    """Output that is one JSON value valid under `schema`; None: any JSON object (JSON mode)."""
    if schema is not None and not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    schema = bounded_numbers(schema or {"type": "object"})
    return llguidance.LLMatcher.grammar_from_json_schema(schema, JSON_STYLE)


def tool_calls_grammar(tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
    """Output that is tool calls and nothing else: one (or, with `parallel`, one or more)
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, the arguments valid
    under the function's parameter schema; `only`: that function."""
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
    return llguidance.LLMatcher.grammar_from_lark(lark)


def grammar_text(kind: str, spec: dict) -> str:
    """The grammar of a request's constraint: `kind` "json_schema" (spec: {"schema"}) or
    "tool_calls" (spec: {"tools", "only", "parallel"})."""
    if kind == "json_schema":
        return json_schema_grammar(spec.get("schema"))
    if kind == "tool_calls":
        return tool_calls_grammar(spec["tools"], spec.get("only"), spec.get("parallel", True))
    raise ValueError(f"unknown grammar kind {kind!r}")


def tokenizer_spec(tokenizer, vocab_size: int) -> dict:
    """A Hugging Face fast tokenizer as llguidance reads it (`llguidance.hf.from_tokenizer` does the
    same): plain data, so that a worker process builds the same `LLTokenizer` without transformers."""
    backend = copy.copy(tokenizer.backend_tokenizer)  # padding and truncation off, on a copy
    backend.no_padding()
    backend.no_truncation()
    return {"json": backend.to_str(), "n_vocab": vocab_size, "eos_token": tokenizer.eos_token_id}


class Grammars:
    """Compiles constraints for one tokenizer in this process, under `limits` (trusted callers; a
    tenant's go through `grammar_sandbox.GrammarSandbox`); `matcher` starts one row's."""

    def __init__(self, spec: dict, limits: GrammarLimits | None = None) -> None:
        """`spec`: `tokenizer_spec`. The model's vocabulary may be wider than the tokenizer's
        (padded embeddings): those extra ids are never allowed under a grammar."""
        self.spec = spec
        self.limits = limits or GrammarLimits()
        self.vocab_size = spec["n_vocab"]
        self._tokenizer = llguidance.LLTokenizer(spec["json"], n_vocab=self.vocab_size, eos_token=spec["eos_token"])
        self._parser_limits = self.limits.parser_limits()

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, limits: GrammarLimits | None = None) -> Grammars:
        return cls(tokenizer_spec(tokenizer, vocab_size), limits)

    def json_schema(self, schema: dict | None) -> str:
        return self.check(json_schema_grammar(schema))

    def tool_calls(self, tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
        return self.check(tool_calls_grammar(tools, only, parallel))

    def check(self, grammar: str) -> str:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer, limits=self._parser_limits
        )
        if failed:
            raise GrammarError(f"the schema cannot be used for constrained decoding: {messages[0]}")
        return grammar

    def matcher(self, grammar: str) -> RowGrammar:
        return RowGrammar(self._new_matcher(grammar), self.vocab_size)

    def compiled(self, grammar: str) -> CompiledGrammar:
        """`grammar` built once, with its first mask computed (the costliest: it builds what every
        later mask reuses): each row copies it (`CompiledGrammar.row`) and starts from there, in
        microseconds."""
        template = self._new_matcher(grammar)
        template.compute_bitmask()
        if template.is_error():
            raise GrammarError(f"the schema cannot be used for constrained decoding: {template.get_error()}")
        return CompiledGrammar(grammar, template, self.vocab_size)

    def _new_matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._parser_limits)


class CompiledGrammar:
    """A grammar compiled in the server, ready for any number of rows (the engine calls `row()`)."""

    def __init__(self, text: str, template: llguidance.LLMatcher, vocab_size: int) -> None:
        self.text = text
        self._template = template  # at its start, first mask computed; never advanced
        self.vocab_size = vocab_size

    def row(self) -> RowGrammar:
        # A copy shares what the template's first mask built: its own first mask costs nothing.
        return RowGrammar(self._template.deep_copy(), self.vocab_size)


class RowGrammar:
    """One row's position in its grammar. `fill` may run on any one thread at a time."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.words = (vocab_size + 31) // 32

    def fill(self, mask) -> str | None:
        """Write the row's allowed next tokens into `mask`, a host int32 tensor of `words` words.
        Returns what the client is told when one of llguidance's limits stopped the grammar (the
        matcher is then in error for good), else None."""
        self._matcher.unsafe_compute_mask_ptr(mask.data_ptr(), self.words * 4)
        return self.refusal if self._matcher.is_error() else None

    def accept(self, token: int) -> bool:
        """Feed the chosen token; False if the grammar refuses it (it never should: it was masked,
        unless one of llguidance's limits stopped the grammar on the way)."""
        return self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the reply ends here)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    @property
    def refusal(self) -> str:
        """What the client is told when one of llguidance's limits stopped its grammar mid-reply."""
        reason = self.error.splitlines()[0] if self.error else "stopped"  # without llguidance's "<non-verbose/>"
        return f"the requested structure (response_format or tools) is too complex to follow: {reason}; simplify it"


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
