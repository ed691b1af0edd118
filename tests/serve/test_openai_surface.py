"""What real clients use beyond plain chat, with the official openai client against a real server:
structured output (`.parse()` with a pydantic model), tool calls and their round trip, logprobs,
`n` choices, text completions, streaming of each; and a 400 for what is not supported."""

from __future__ import annotations

import json
import math
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from lorafleet.data.encode import encode_prompt
from lorafleet.data.records import ChatRecord, Message
from lorafleet.models.loading import load_base
from tests.serve.conftest import KEYS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },  # fmt: skip
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Shape(BaseModel):
    colour: Literal["red", "green", "blue"]
    sides: int = Field(ge=0, le=9)
    filled: bool


CLOSED_SHAPE = Shape.model_json_schema() | {"additionalProperties": False}  # else any extra keys may follow


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["ops"], max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model_returns_a_valid_object(keyed_server):
    url, _ = keyed_server
    for model in ("finance", "base"):  # the grammar forces the shape whatever the weights say
        completion = client(url).chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Describe the shape."}], response_format=Shape,
            max_tokens=60, temperature=0.8, seed=3,
        )  # fmt: skip
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Shape), completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "stop"


def test_json_mode_streams_one_json_object(keyed_server):
    url, _ = keyed_server
    stream = client(url).chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "JSON please"}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": CLOSED_SHAPE}}, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert Shape.model_validate_json(text)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_forced_tool_call_round_trip(keyed_server):
    url, _ = keyed_server
    # One call: a random model, free to go on after it, would make calls until max_tokens.
    first = client(url).chat.completions.create(
        model="finance", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        max_tokens=120,
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert arguments["city"] in ("Paris", "Oslo") and 1 <= arguments["days"] <= 3
    # The client sends the call back with its result, as every agent framework does.
    history = ASK + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                                                                     "content": '{"celsius": 18}'}]  # fmt: skip
    second = client(url).chat.completions.create(model="finance", messages=history, tools=[WEATHER], max_tokens=5)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The tools are in the prompt (the chat template describes them), and so is the call's result.
    without_tools = client(url).chat.completions.create(model="finance", messages=ASK, max_tokens=1)
    assert first.usage.prompt_tokens > without_tools.usage.prompt_tokens + 50
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_a_named_tool_call_streams_as_tool_call_deltas(keyed_server):
    url, _ = keyed_server
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    stream = client(url).chat.completions.create(
        model="legal", messages=ASK, tools=[other, WEATHER], max_tokens=120, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    deltas = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas))["city"] in ("Paris", "Oslo")
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_tool_call_cut_off_by_max_tokens_is_returned_as_openai_returns_it(keyed_server):
    """finish_reason "length", no content (no markup), and the call as far as it was written once
    its name is complete: its arguments stop where the reply stopped. Streamed and not alike."""
    url, _ = keyed_server
    ask = {"model": "finance", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
           "parallel_tool_calls": False, "temperature": 0}  # fmt: skip
    whole = client(url).chat.completions.create(**ask, max_tokens=120, logprobs=True).choices[0]
    assert whole.finish_reason == "tool_calls"
    arguments = whole.message.tool_calls[0].function.arguments
    tokens = [entry.token for entry in whole.logprobs.content]  # greedy: every cut reply is a prefix
    written = ["".join(tokens[:count]) for count in range(len(tokens) + 1)]
    in_name = next(i for i, text in enumerate(written) if '"name": "get_w' in text)
    in_arguments = next(i for i, text in enumerate(written) if '"arguments": {"city' in text)
    so_far = written[in_arguments].split('"arguments": ', 1)[1]
    assert arguments.startswith(so_far) and so_far != arguments
    # Cut in <tool_call>, in the name, in the arguments, in </tool_call> (the arguments are whole).
    for cut, expected in ((3, []), (in_name, []), (in_arguments, [so_far]), (len(tokens) - 1, [arguments])):
        reply = client(url).chat.completions.create(**ask, max_tokens=cut).choices[0]
        assert reply.finish_reason == "length" and reply.message.content is None, (cut, reply)
        calls = reply.message.tool_calls or []
        assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", a) for a in expected]
        chunks = [c for c in client(url).chat.completions.create(**ask, max_tokens=cut, stream=True) if c.choices]
        assert not any(c.choices[0].delta.content for c in chunks), (cut, chunks)
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", a) for a in expected]
        assert chunks[-1].choices[0].finish_reason == "length"


def test_tool_call_text_of_the_model_becomes_tool_calls():
    """The parser on the format Qwen2.5 / InternVL3 write (auto tool choice leaves it to the model)."""
    from lorafleet.serve.gateway.tools import ToolCallText, split_tool_calls

    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = split_tool_calls(text)
    assert content == "Checking." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert split_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    streamed = ToolCallText()
    sent = "".join(streamed.add(text[i : i + 3]) for i in range(0, len(text), 3))
    assert sent == "Checking.\n" and streamed.finish()[1][0]["function"]["name"] == "get_weather"
    plain = ToolCallText()
    assert plain.add("a <tool") == "a " and plain.add("box>") == "<toolbox>" and plain.finish() == ("", [])


def test_a_reply_cut_off_in_a_call_keeps_the_calls_and_no_markup():
    """What a model may write before max_tokens cuts it off (auto tool choice, parallel calls)."""
    from lorafleet.serve.gateway.tools import ToolCallText, split_tool_calls

    whole = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    cut = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    content, calls = split_tool_calls(cut, truncated=True)
    assert content == "Checking." and calls[0]["function"]["arguments"] == '{"city": "Pa'
    content, calls = split_tool_calls(whole + "\n<tool_", truncated=True)
    assert content is None and [c["function"]["arguments"] for c in calls] == ['{"city": "Oslo"}']
    assert split_tool_calls('Hm <tool_call>\n{"name": "get_', truncated=True) == ("Hm", [])
    assert split_tool_calls("plain text, cut", truncated=True) == ("plain text, cut", [])
    assert split_tool_calls(cut) == (cut, [])  # not cut off: the model's own text, as it wrote it
    streamed = ToolCallText()
    sent = "".join(streamed.add(piece) for piece in (whole[:30], whole[30:], "\n", cut[:15], cut[15:]))
    rest, calls = streamed.finish(truncated=True)
    assert sent == "" and rest == "Checking." and [c["function"]["arguments"] for c in calls] == [
        '{"city": "Oslo"}', '{"city": "Pa'
    ]  # fmt: skip


def test_logprobs_are_the_models_own(keyed_server, fleet_dir):
    url, _ = keyed_server
    reply = client(url).chat.completions.create(
        model="base", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode() == reply.choices[0].message.content
    base = load_base(fleet_dir / "base")
    prompt = encode_prompt(ChatRecord([Message("user", ASK[0]["content"])]), base)
    ids = prompt.input_ids.tolist()
    for entry in entries:
        with torch.no_grad():
            logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        expected = torch.log_softmax(logits, -1)
        token = int(expected.argmax())
        assert math.isclose(entry.logprob, float(expected[token]), abs_tol=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        ids.append(token)


def test_n_choices_plain_and_streamed(keyed_server):
    url, _ = keyed_server
    reply = client(url).chat.completions.create(
        model="finance", messages=ASK, max_tokens=8, n=3, temperature=1.0, seed=7, logprobs=True
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    again = client(url).chat.completions.create(
        model="finance", messages=ASK, max_tokens=8, n=3, temperature=1.0, seed=7, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finished = ["", "", ""], set()
    for chunk in again:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert texts == [c.message.content for c in reply.choices]  # same seeds, same replies
    assert reply.system_fingerprint and reply.system_fingerprint.startswith("lorafleet-")


def test_text_completions(keyed_server):
    url, _ = keyed_server
    reply = client(url).completions.create(model="legal", prompt="The invoice", max_tokens=5, temperature=0,
                                           logprobs=2)  # fmt: skip
    (choice,) = reply.choices
    assert reply.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs[0]) == 2
    streamed = client(url).completions.create(model="legal", prompt="The invoice", max_tokens=5, temperature=0,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    several = client(url).completions.create(model="legal", prompt=["a", "b"], max_tokens=2, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_model_lookup_request_id_and_fingerprint(keyed_server):
    url, _ = keyed_server
    assert client(url).models.retrieve("finance").parent
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("nope")
    headers = {"Authorization": f"Bearer {KEYS['ops']}", "X-Request-Id": "trace-42"}
    body = {"model": "finance", "messages": ASK, "max_tokens": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["system_fingerprint"].startswith("lorafleet-")
    fresh = httpx.post(f"{url}/v1/chat/completions", json=body | {"model": "nope"}, headers={
        "Authorization": f"Bearer {KEYS['ops']}"}, timeout=60)  # fmt: skip
    assert fresh.status_code == 404 and fresh.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"response_format": {"type": "regex"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "schema",
        ),  # fmt: skip
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "other"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"n": 9}, "n"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ],
)
def test_unsupported_or_invalid_parameters_get_400_not_a_silent_200(keyed_server, extra, fragment):
    url, _ = keyed_server
    body = {"model": "finance", "messages": ASK, "max_tokens": 2} | extra
    headers = {"Authorization": f"Bearer {KEYS['ops']}"}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_langchain_structured_output(keyed_server):
    langchain_openai = pytest.importorskip("langchain_openai")
    url, _ = keyed_server
    model = langchain_openai.ChatOpenAI(
        model="finance", base_url=f"{url}/v1", api_key=KEYS["ops"], max_tokens=60, max_retries=0
    )
    shape = model.with_structured_output(Shape, method="json_schema").invoke("Describe the shape.")
    assert isinstance(shape, Shape)
