"""Constrained decoding: what a grammar lets a model write."""

from __future__ import annotations

import json
import math

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.grammar import NUMBER_LIMIT, Grammars
from lorafleet.serve.engine.sampling import SamplingParams

NUMBERS = {
    "type": "object",
    "properties": {
        "a": {"type": "number"},
        "b": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "c": {"type": "integer", "minimum": 0},
    },
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"days": {"type": "number"}}}},
}


def numbers_in(value: object) -> list[int | float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_a_random_model_under_a_schema_writes_only_finite_numbers(tiny_lm_dir):
    """Sampled at temperature 1, the random tiny model wrote exponents such as 8E2033750 in half of
    these replies (infinity to json.loads) before numbers were bounded."""
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model), max_batch=16, max_seq_len=256)
    grammar = engine.grammars.json_schema(NUMBERS)
    streams = []
    for seed in range(16):
        ids = torch.tensor([5, 6, 7, 10 + seed])
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, grammar=grammar)
        streams.append(engine.submit(Example(ids, torch.full_like(ids, IGNORE_INDEX), None), None, params))
    engine.run_until_idle()
    for stream in streams:
        events = list(stream)
        assert events[-1].finish_reason == "stop", events[-1]
        reply = json.loads("".join(event.text for event in events))
        for number in numbers_in(reply):
            assert math.isfinite(number) and abs(number) <= NUMBER_LIMIT, reply


def accepts(grammars: Grammars, grammar: str, tokenizer, text: str) -> bool:
    row = grammars.matcher(grammar)
    return all(row.accept(token) for token in tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_grammar_refuses_a_number_a_double_cannot_hold(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    tokenizer = base.tokenizer
    grammars = Grammars.for_tokenizer(tokenizer, base.model.get_output_embeddings().weight.shape[0])
    json_mode = grammars.json_schema(None)
    schema = grammars.json_schema(NUMBERS)
    tools = grammars.tool_calls([WEATHER])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"days": '
    for grammar, start in ((json_mode, '{"x": [1, {"y": '), (schema, '{"a": '), (tools, call)):
        assert accepts(grammars, grammar, tokenizer, start + f"{NUMBER_LIMIT}")
        assert accepts(grammars, grammar, tokenizer, start + "-2.5")
        for literal in ("1.19E391919891919198", "1e5", f"{NUMBER_LIMIT + 1}", "1" * 400):
            assert not accepts(grammars, grammar, tokenizer, start + literal), (start, literal)
    # A bound the schema sets itself is kept, beyond the limit too.
    big = grammars.json_schema({"type": "integer", "minimum": 10**17})
    assert accepts(grammars, big, tokenizer, str(10**17 + 1)) and not accepts(grammars, big, tokenizer, "-5")
