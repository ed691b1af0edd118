"""Grammar-constrained decoding: JSON mode, JSON Schema output and forced tool calls.

A request's constraint is compiled once, when it arrives (an invalid schema is the client's error,
a 400), into an llguidance grammar. The engine gives each constrained row its own matcher: before
every step the matcher fills the row's bitmask of the tokens it may take next, the device applies
it to the logits (`device_sampling.allowed_tokens`), and the token chosen is fed back. Rows without
a grammar in the same batch are untouched; a step with no constrained row carries no mask at all.

JSON is written as Python's `json.dumps` writes it (", " and ": ", no other whitespace): what chat
templates render with `tojson`, so models see their own format, and a small model cannot wander
off into whitespace.
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
        return self.check(llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, JSON_STYLE))

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
        schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
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


def bitmask_for(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask that allows every token to every row (rows without a grammar stay so)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
