"""Every resource one tenant's request can spend is bounded, so that mutually hostile tenants
cannot take the service from one another (docs/security.md, "Limits and their defaults"): tokens
are metered for every prompt and every choice before anything runs. All through a real server on
127.0.0.1, with limits set tight so that each attack is small."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
import yaml
from transformers import AutoTokenizer

from lorafleet.serve.gateway.tenants import hash_key, load_tenants
from tests.serve.conftest import running_server
from tests.serve.test_audit_trail import copy_fleet, entries

TENANTS = {
    "victim": {"key": "sk-victim", "adapters": "*"},
    "hostile": {"key": "sk-hostile", "adapters": "*"},
    "metered": {"key": "sk-metered", "adapters": "*", "tokens_per_minute": 300},
    "ops": {"key": "sk-ops", "adapters": "*", "admin": True},
}


def key(tenant: str) -> str:
    return TENANTS[tenant]["key"]


@pytest.fixture(scope="module")
def limited(fleet_dir, tmp_path_factory):
    """A server of its own (its own request log and audit log) for the tenants above."""
    from lorafleet.serve.gateway.server import ServeOptions

    root = tmp_path_factory.mktemp("limited")
    fleet = copy_fleet(fleet_dir, root)
    keys = root / "keys.yaml"
    tenants = [{"name": name, "key_sha256": hash_key(t["key"])} | {k: v for k, v in t.items() if k != "key"}
               for name, t in TENANTS.items()]  # fmt: skip
    keys.write_text(yaml.safe_dump({"tenants": tenants}))
    options = ServeOptions(fleet_dir=fleet, tenants=load_tenants(keys))
    with running_server(options) as (url, server):
        yield url, server, fleet


def client(url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key(tenant), max_retries=0, timeout=120)


def metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key('ops')}"}).text
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_every_prompt_and_choice_is_metered_and_a_request_over_the_minute_is_refused(limited, fleet_dir):
    url, server, fleet = limited
    metered = client(url, "metered")
    # 12 prompts x n=8 x 4 tokens alone is 384 > 300: no wait would let it run (it ran, uncounted, before).
    with pytest.raises(openai.RateLimitError, match="Request too large.*limit 300"):
        metered.completions.create(model="base", prompt=["a b c"] * 12, n=8, max_tokens=4)
    prompts = ["one two", "three four five six", "seven"]
    tokenizer = AutoTokenizer.from_pretrained(fleet_dir / "base")
    expected = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    before = metric(url, "lorafleet_tokens_total", 'kind="prompt",model="base"')
    reply = metered.completions.create(model="base", prompt=prompts, n=2, max_tokens=3, temperature=0, logprobs=0)
    usage_please = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = metered.completions.create(
        model="base", prompt=prompts, n=2, max_tokens=3, temperature=0, **usage_please
    )
    usage = [chunk.usage for chunk in streamed if chunk.usage][0]
    assert reply.usage.prompt_tokens == usage.prompt_tokens == expected, "every prompt counted, once each"
    assert reply.usage.completion_tokens == sum(len(choice.logprobs.tokens) for choice in reply.choices)
    assert metric(url, "lorafleet_tokens_total", 'kind="prompt",model="base"') - before == 2 * expected
    server.audit.flush()
    logged = [e["data"] for e in entries(fleet) if e["event"] == "serve.request" and e["data"]["tenant"] == "metered"]
    assert [e["prompt_tokens"] for e in logged] == [0, expected, expected]
    assert [e["status"] for e in logged] == [429, 200, 200]
