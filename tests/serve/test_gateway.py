"""The gateway, driven by the official openai client against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sqlite3

import httpx
import openai
import pytest
from PIL import Image, ImageDraw

from lorafleet.data.records import ChatRecord, Message
from lorafleet.serve.gateway.server import ServeOptions
from tests.peft_generate import peft_greedy_replies
from tests.serve.conftest import KEYS, running_server

QUESTION = "What is the invoice total?"


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def png_data_url(size=(96, 64), colour="red") -> str:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def peft_greedy(fleet_dir, adapter: str | None, record: ChatRecord, max_new_tokens: int = 8) -> str:
    """What peft + transformers generate for the same adapter and prompt."""
    return peft_greedy_replies(fleet_dir, adapter, [record], max_new_tokens)[0]


def test_models_lists_what_the_key_may_use(keyed_server):
    url, _ = keyed_server
    finance = {m.id: m for m in client(url, KEYS["finance-team"]).models.list()}
    assert set(finance) == {"base", "finance"}
    assert finance["finance"].model_extra["parent"] == "base"
    everything = {m.id for m in client(url, KEYS["ops"]).models.list()}
    assert {"base", "finance", "legal"} <= everything


def test_each_adapter_answers_as_peft_does(keyed_server, fleet_dir):
    url, _ = keyed_server
    ops = client(url, KEYS["ops"])
    record = ChatRecord([Message("user", QUESTION)])
    replies = {}
    for model in ("finance", "legal", "base"):
        response = ops.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8
        )
        replies[model] = response.choices[0].message.content
        assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens >= 1
        assert replies[model] == peft_greedy(fleet_dir, None if model == "base" else model, record)
    assert len(set(replies.values())) == 3, "adapters must make a difference for this test to mean anything"


def test_mixed_adapter_burst_gives_each_request_its_own_adapter(keyed_server):
    url, _ = keyed_server
    ops = client(url, KEYS["ops"])
    alone = {
        m: ops.chat.completions.create(
            model=m, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=6
        )
        .choices[0]
        .message.content
        for m in ("finance", "legal", "base")
    }

    async def burst():
        async_client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEYS["ops"], max_retries=0, timeout=300)
        models = ["finance", "legal", "base"] * 4
        responses = await asyncio.gather(
            *[
                async_client.chat.completions.create(
                    model=m, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=6
                )
                for m in models
            ]
        )
        return list(zip(models, responses, strict=True))

    for model, response in asyncio.run(burst()):
        assert response.choices[0].message.content == alone[model]


def test_streaming_matches_the_plain_reply_and_ends_with_done(keyed_server):
    url, _ = keyed_server
    ops = client(url, KEYS["ops"])
    plain = ops.chat.completions.create(
        model="legal", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8
    )
    chunks = list(
        ops.chat.completions.create(
            model="legal",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    raw = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEYS['ops']}"},
        json={"model": "legal", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3},
        timeout=60,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_image_question_answers_as_peft_does(keyed_server, fleet_dir):
    url, _ = keyed_server
    data_url = png_data_url()
    content = [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Colour?"}]
    response = client(url, KEYS["finance-team"]).chat.completions.create(
        model="finance", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
    )
    image = base64.b64decode(data_url.split(",", 1)[1])
    record = ChatRecord([Message("user", "<image>\nColour?")], [image])
    assert response.choices[0].message.content == peft_greedy(fleet_dir, "finance", record)


def test_a_tenant_cannot_use_another_tenants_adapter(keyed_server):
    url, _ = keyed_server
    with pytest.raises(openai.NotFoundError) as denied:
        client(url, KEYS["finance-team"]).chat.completions.create(
            model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert denied.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(url, "sk-wrong").models.list()


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ("{not json", 400, "JSON"),
        ({"model": "finance"}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        (
            {
                "model": "finance",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                    }
                ],
            },
            400,
            "base64",
        ),
        (
            {
                "model": "finance",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ],
            },
            400,
            "not allowed",
        ),
        ({"model": "finance", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": "finance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "context"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(keyed_server, payload, status, fragment):
    url, _ = keyed_server
    headers = {"Authorization": f"Bearer {KEYS['ops']}", "Content-Type": "application/json"}
    body = payload if isinstance(payload, str) else json.dumps(payload)
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment.lower() in error["message"].lower() and error["type"]
    ok = client(url, KEYS["ops"]).chat.completions.create(
        model="finance", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_oversized_image_is_rejected(fleet_dir):
    options = ServeOptions(fleet_dir=fleet_dir, max_image_pixels=100 * 100)
    with running_server(options) as (url, _):
        content = [{"type": "image_url", "image_url": {"url": png_data_url(size=(200, 200))}}]
        with pytest.raises(openai.BadRequestError, match="over the limit"):
            client(url).chat.completions.create(model="finance", messages=[{"role": "user", "content": content}])


def test_rate_limit_answers_429_with_retry_after(keyed_server):
    url, _ = keyed_server
    tight = client(url, KEYS["tight"])
    for _ in range(2):
        tight.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        tight.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_admin_unloads_and_loads_adapters_at_runtime(keyed_server):
    url, _ = keyed_server
    admin = {"Authorization": f"Bearer {KEYS['ops']}"}
    refused = httpx.delete(f"{url}/v1/adapters/legal", headers={"Authorization": f"Bearer {KEYS['legal-team']}"})
    assert refused.status_code == 403
    assert httpx.delete(f"{url}/v1/adapters/legal", headers=admin, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client(url, KEYS["ops"]).chat.completions.create(model="legal", messages=[{"role": "user", "content": "x"}])
    loaded = httpx.post(
        f"{url}/v1/adapters", headers=admin, json={"name": "legal", "path": "adapters/legal"}, timeout=60
    )
    assert loaded.status_code == 200
    again = client(url, KEYS["ops"]).chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert again.choices[0].message.content is not None


def test_health_ready_metrics_and_request_log(keyed_server, fleet_dir):
    url, _ = keyed_server
    client(url, KEYS["finance-team"]).chat.completions.create(
        model="finance", messages=[{"role": "user", "content": "log me"}], max_tokens=2
    )
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready", timeout=60).status_code == 200
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text  # keyed
    assert 'lorafleet_requests_total{model="finance",status="200"}' in metrics
    assert 'lorafleet_tokens_total{kind="completion",model="finance"}' in metrics
    rows = (
        sqlite3.connect(fleet_dir / "lorafleet.sqlite")
        .execute("SELECT tenant, model, status, prompt_tokens, content FROM requests WHERE tenant = 'finance-team'")
        .fetchall()
    )
    assert ("finance-team", "finance", 200) in {r[:3] for r in rows}
    assert all(r[3] > 0 and r[4] is None for r in rows if r[2] == 200)


def test_metrics_count_requests_and_tokens_per_tenant_and_the_queue(keyed_server):
    url, _ = keyed_server
    client(url, KEYS["legal-team"]).chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "count me"}], max_tokens=2
    )
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text
    assert 'lorafleet_tenant_requests_total{model="legal",status="200",tenant="legal-team"}' in metrics
    assert 'lorafleet_tenant_tokens_total{kind="completion",model="legal",tenant="legal-team"}' in metrics
    assert "lorafleet_waiting_requests 0.0" in metrics


@pytest.mark.slow
def test_a_burst_of_200_concurrent_requests_gets_no_server_errors(keyed_server):
    url, _ = keyed_server
    models = ["finance", "legal", "base", "finance-typo"]

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
            requests = [
                http.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEYS['ops']}"},
                    json={
                        "model": models[i % 4],
                        "messages": [{"role": "user", "content": f"q{i}"}],
                        "max_tokens": 4,
                        "temperature": 0.7,
                        "seed": i,
                        "stream": i % 5 == 0,
                    },
                )
                for i in range(200)
            ]
            return [r.status_code for r in await asyncio.gather(*requests)]

    statuses = asyncio.run(burst())
    # One tenant's 200 at once: 32 in flight and 128 waiting their turn (the defaults); any more
    # are told to come back (429), and none is a server error.
    expected = [404 if models[i % 4] == "finance-typo" else 200 for i in range(200)]
    assert all(status in (answer, 429) for status, answer in zip(statuses, expected, strict=True)), statuses
    assert statuses.count(429) <= 200 - 32 - 128


def test_images_are_tiled_as_the_adapter_was_trained(tiny_vlm_dir, tmp_path):
    """An adapter trained with max_tiles: 1 sees a wide image as one tile (plus the thumbnail) when
    served, not the processor's default tiling; --max-tiles overrides."""
    from lorafleet.config import AdapterSpec, FleetSpec
    from lorafleet.train.trainer import train_fleet
    from tests.conftest import write_image_dataset

    data = write_image_dataset(tmp_path / "d.jsonl", n=4, seed=0)
    spec = FleetSpec(base=str(tiny_vlm_dir), output=str(tmp_path / "fleet"), max_tiles=1, checkpoint_every=0,
                     adapters=[AdapterSpec(name="narrow", data=str(data), rank=2, steps=1)])  # fmt: skip
    train_fleet(spec, progress=False)
    wide = [{"type": "image_url", "image_url": {"url": png_data_url((320, 64))}}, {"type": "text", "text": "?"}]

    def prompt_tokens(url, model):
        reply = client(url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": wide}], max_tokens=1
        )
        return reply.usage.prompt_tokens

    with running_server(ServeOptions(fleet_dir=tmp_path / "fleet", base_dir=tiny_vlm_dir)) as (url, _):
        narrow, default = prompt_tokens(url, "narrow"), prompt_tokens(url, "base")
    with running_server(ServeOptions(fleet_dir=tmp_path / "fleet", base_dir=tiny_vlm_dir, max_tiles=1)) as (url, _):
        forced = prompt_tokens(url, "base")
    assert narrow < default, "the adapter's own tiling, not the processor's default"
    assert forced == narrow
