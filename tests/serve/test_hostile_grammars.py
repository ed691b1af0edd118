"""Grammars from a hostile tenant (docs/security.md): a schema that would compile for ever, grow
the server by gigabytes or make every mask slow costs its sender a 400 and nobody else anything.
Through a real server on 127.0.0.1 with tight limits, the sandbox's real worker processes and
the engine's real mask threads; sizes are small so that each test takes seconds."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import pytest
import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.grammar import GrammarLimits, Grammars
from lorafleet.serve.engine.masks import MaskWorkers
from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.engine.streams import Row
from lorafleet.serve.gateway.server import ServeOptions
from lorafleet.serve.gateway.tenants import load_tenants
from tests.serve.conftest import KEYS, running_server

VICTIM, HOSTILE = KEYS["finance-team"], KEYS["legal-team"]
TIGHT = GrammarLimits(compile_timeout_s=1.5, compile_memory_mb=256, mask_budget_ms=50)
# What the server process may grow by while it is attacked. A refused compile costs it nothing (its
# worker held the memory); a grammar it accepts costs its matcher (a few MiB at these sizes).
SERVER_GROWTH_BOUND_MB = 256


def all_of_regexes(count: int) -> dict:
    """The issue's first row: a string that must match every one of `count` regexes (89 kB at 2,000)."""
    return {"type": "string", "allOf": [{"pattern": f"^(a|b)*{i:x}(c|d)*$"} for i in range(count)]}


def pattern_properties(count: int, tag: str = "") -> dict:
    return {
        "type": "object",
        "patternProperties": {f"^p{i}{tag}[a-z]+[0-9]*$": {"type": "string"} for i in range(count)},
    }


def optional_properties(count: int, tag: str = "") -> dict:
    return {"type": "object", "properties": {f"prop{tag}{i}": {"type": "string"} for i in range(count)}}


def with_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "hostile", "schema": schema}}


def chat(model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def hostile_chat(schema: dict) -> dict:
    return chat("legal", "hi", response_format=with_schema(schema))


@pytest.fixture(scope="module")
def guarded_server(fleet_dir, keys_file):
    options = ServeOptions(fleet_dir=fleet_dir, tenants=load_tenants(keys_file), grammar_limits=TIGHT)
    with running_server(options) as running:
        yield running


class MemoryWatch:
    """The process's resident memory, sampled every 20 ms while in use: the growth of its peak."""

    def __enter__(self) -> MemoryWatch:
        self.start = self.peak = resident_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, resident_mb())

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return self.peak - self.start


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


async def send(client: httpx.AsyncClient, key: str, body: dict) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    reply = await client.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
    return reply, time.perf_counter() - started


async def victim_round(client: httpx.AsyncClient) -> list[tuple[httpx.Response, float]]:
    """The victim tenant's 12 plain chats, sent together."""
    return await asyncio.gather(*(send(client, VICTIM, chat("finance", f"question {i}")) for i in range(12)))


def attack(url: str, hostile_bodies: list[dict], victim_extra: dict | None = None) -> tuple:
    """The victim's 12 requests (and `victim_extra`, sent with them) while the hostile tenant's are
    under way, and its unloaded p99 from rounds of the same 12 before and after: (unloaded p99, the
    victim's replies and latencies under attack, the hostile replies, `victim_extra`'s reply and
    latency or None). The baseline is a tail estimated from 48 requests on either side of the
    attack, so that a machine shared with other work does not make it a lucky draw."""

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await victim_round(client)  # warm: the first requests of a fresh server pay for its caches
            calm = [await victim_round(client) for _ in range(2)]
            hostile = [asyncio.create_task(send(client, HOSTILE, body)) for body in hostile_bodies]
            await asyncio.sleep(0.3)  # the hostile compiles are under way
            extra = asyncio.create_task(send(client, VICTIM, victim_extra)) if victim_extra else None
            victim = await victim_round(client)
            hostile_replies = [reply for reply, _ in await asyncio.gather(*hostile)]
            extra_reply = await extra if extra else None
            calm += [await victim_round(client) for _ in range(2)]
            unloaded = p99([latency for replies in calm for _, latency in replies])
            return unloaded, victim, hostile_replies, extra_reply

    return asyncio.run(run())


def check_victim_unharmed(unloaded: float, victim: list[tuple[httpx.Response, float]]) -> None:
    assert [reply.status_code for reply, _ in victim] == [200] * 12, [reply.text for reply, _ in victim]
    loaded = p99([latency for _, latency in victim])
    assert loaded < 2 * unloaded, f"the victim's p99 went from {unloaded:.3f} s to {loaded:.3f} s"


def error_of(reply: httpx.Response) -> str:
    return reply.json()["error"]["message"]


# --- the issue's rows, through the server --------------------------------------------------


def test_all_of_two_thousand_regexes_is_refused_at_its_limit_and_the_server_does_not_grow(guarded_server):
    url, _ = guarded_server
    with MemoryWatch() as memory:
        unloaded, victim, hostile, _ = attack(url, [hostile_chat(all_of_regexes(2000))])
    check_victim_unharmed(unloaded, victim)
    (reply,) = hostile
    assert reply.status_code == 400, reply.text
    message = error_of(reply)
    assert "the response_format schema took longer than 1.5 s to compile" in message or (
        "the response_format schema needs more than 256 MiB to compile" in message
    ), message
    assert memory.growth_mb < SERVER_GROWTH_BOUND_MB, f"the server grew by {memory.growth_mb:.0f} MiB"


def test_six_pattern_properties_schemas_cost_their_sender_six_400s_and_nobody_else_a_thing(guarded_server):
    url, _ = guarded_server
    bodies = [hostile_chat(pattern_properties(1000, tag=f"t{n}")) for n in range(6)]
    own_schema = chat("finance", "hi", response_format=with_schema({"type": "object"}))
    with MemoryWatch() as memory:
        unloaded, victim, hostile, (structured, waited) = attack(url, bodies, own_schema)
    check_victim_unharmed(unloaded, victim)
    # the hostile tenant's compiles run one at a time, on one worker: the victim's own schema
    # compiles on another meanwhile, never behind the six (9 s at 1.5 s each)
    assert structured.status_code == 200 and waited < 3 * TIGHT.compile_timeout_s, (structured.text, waited)
    assert [reply.status_code for reply in hostile] == [400] * 6
    assert all("took longer than 1.5 s to compile; simplify it" in error_of(reply) for reply in hostile)
    assert memory.growth_mb < SERVER_GROWTH_BOUND_MB, f"the server grew by {memory.growth_mb:.0f} MiB"


def test_thousands_of_optional_properties_fail_their_own_request_with_a_400_and_never_stall_others(guarded_server):
    """Before: each matcher was built on the engine thread holding the model lock (seconds), and the
    reply ended as a 500 when llguidance's item limit stopped the grammar mid-reply."""
    url, _ = guarded_server
    bodies = [hostile_chat(optional_properties(2000, tag=f"t{n}")) for n in range(3)]
    with MemoryWatch() as memory:
        unloaded, victim, hostile, _ = attack(url, bodies)
    check_victim_unharmed(unloaded, victim)
    assert [reply.status_code for reply in hostile] == [400] * 3, [reply.text for reply in hostile]
    assert all("simplify" in error_of(reply) for reply in hostile), [error_of(reply) for reply in hostile]
    assert memory.growth_mb < SERVER_GROWTH_BOUND_MB, f"the server grew by {memory.growth_mb:.0f} MiB"


def test_schema_and_tools_over_their_caps_are_refused_before_anything_compiles_them(guarded_server):
    url, _ = guarded_server
    deep: dict = {"type": "string"}
    for _ in range(20):  # 41 levels of objects: past the schema's 32, within the body's 64 (--max-json-depth)
        deep = {"type": "object", "properties": {"x": deep}}
    big = {"type": "object", "description": "x" * 200_000}
    tool = {"type": "function", "function": {"name": "f", "description": "y" * 200_000, "parameters": {}}}
    cases = {
        "nested deeper than 32 levels": chat("legal", "hi", response_format=with_schema(deep)),
        "response_format.json_schema.schema: over 131072 bytes": chat("legal", "hi", response_format=with_schema(big)),
        "tools: over 131072 bytes": chat("legal", "hi", tools=[tool]),
    }

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(send(client, HOSTILE, body) for body in cases.values()))

    for fragment, (reply, _) in zip(cases, asyncio.run(run()), strict=True):
        assert reply.status_code == 400, (fragment, reply.text)
        assert fragment in error_of(reply), (fragment, error_of(reply))
        assert reply.json()["error"]["param"] in ("response_format", "tools")


# --- the sandbox and the engine's masks on their own ----------------------------------------


def test_the_size_cap_counts_compact_json_bytes_exactly_and_the_depth_cap_needs_no_recursion():
    from lorafleet.serve.engine.grammar import GrammarError, check_size

    values = [
        {"type": "object", "properties": {"é\n": {"enum": [1, 2.5e300, None, True, '"q"']}}, "required": []},
        [[], {}, [{"a": -0.0}], "x" * 50, 10**30],
        optional_properties(40),
    ]
    for value in values:
        size = len(json.dumps(value, separators=(",", ":")))
        check_size(value, size, 32, "tools")
        with pytest.raises(GrammarError, match=f"tools: over {size - 1} bytes as JSON"):
            check_size(value, size - 1, 32, "tools")
    deep: list = []
    for _ in range(100_000):  # far past Python's recursion limit
        deep = [deep]
    with pytest.raises(GrammarError, match="nested deeper than 32 levels"):
        check_size(deep, 10**9, 32, "tools")


@pytest.fixture(scope="module")
def tiny_grammars(tiny_lm_dir) -> tuple:
    base = load_base(tiny_lm_dir)
    return base, base.model.get_output_embeddings().weight.shape[0]


def test_a_killed_worker_is_replaced_and_compiled_grammars_are_cached_per_tenant(tiny_grammars):
    from lorafleet.serve.engine.grammar import GrammarError
    from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox

    base, vocab = tiny_grammars
    limits = GrammarLimits(compile_timeout_s=1.0, compile_memory_mb=128, compile_workers=1, cached_per_tenant=2)
    sandbox = GrammarSandbox(Grammars.for_tokenizer(base.tokenizer, vocab, limits))
    small = {"type": "object", "properties": {"a": {"type": "integer"}}}

    async def compile(tenant: str, schema: dict):
        try:
            return await sandbox.compile(tenant, "json_schema", {"schema": schema}, "response_format schema")
        except GrammarError as err:
            return str(err)

    async def run():
        refused = await compile("a", pattern_properties(1000))
        after = await compile("a", small)  # the one worker was killed: a fresh one answers
        again, other_tenant = await compile("a", small), await compile("b", small)
        for n in range(2):  # two more for tenant a push `small` out of its two places
            await compile("a", {"type": "integer", "maximum": n})
        evicted = await compile("a", small)
        return refused, after, again, other_tenant, evicted

    try:
        refused, after, again, other_tenant, evicted = asyncio.run(run())
    finally:
        sandbox.close()
    assert refused == "the response_format schema took longer than 1 s to compile; simplify it"
    assert not isinstance(after, str), after
    assert again is after, "the same schema from the same tenant is compiled once"
    assert other_tenant is not after, "another tenant's compile is its own"
    assert evicted is not after, "the cache holds `cached_per_tenant` grammars per tenant"
    row = after.row()
    mask = torch.empty(row.words, dtype=torch.int32)
    assert row.fill(mask) is None and mask.any()


def test_a_tenants_cache_keeps_no_more_grammar_text_than_its_byte_budget(tiny_grammars):
    from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox

    base, vocab = tiny_grammars
    limits = GrammarLimits(compile_workers=1, cache_bytes_per_tenant=100)  # smaller than any grammar's text
    sandbox = GrammarSandbox(Grammars.for_tokenizer(base.tokenizer, vocab, limits))
    spec = {"schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}

    async def twice():
        return [await sandbox.compile("a", "json_schema", spec, "response_format schema") for _ in range(2)]

    try:
        first, second = asyncio.run(twice())
    finally:
        sandbox.close()
    assert len(first.text) > 100 and second is not first, "a grammar over the tenant's byte budget is not kept"


def test_a_compile_past_its_memory_limit_ends_its_worker_not_the_server(tiny_grammars):
    from lorafleet.serve.engine.grammar import GrammarError
    from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox

    base, vocab = tiny_grammars
    limits = GrammarLimits(compile_timeout_s=60, compile_memory_mb=64, compile_workers=1)
    sandbox = GrammarSandbox(Grammars.for_tokenizer(base.tokenizer, vocab, limits))
    try:
        with MemoryWatch() as memory, pytest.raises(GrammarError, match="needs more than 64 MiB to compile"):
            asyncio.run(sandbox.compile("a", "json_schema", {"schema": all_of_regexes(200)}, "response_format schema"))
    finally:
        sandbox.close()
    assert memory.growth_mb < 64


def test_a_schema_the_compiler_raises_on_is_refused_as_the_schemas_fault_and_its_worker_lives_on(tiny_grammars):
    """llguidance raises ValueError on a number no double holds (`minimum: 10**300`): a 400 that
    says so, not a worker ended and reported as out of memory."""
    from lorafleet.serve.engine.grammar import GrammarError
    from lorafleet.serve.engine.grammar_sandbox import GrammarSandbox

    base, vocab = tiny_grammars
    sandbox = GrammarSandbox(Grammars.for_tokenizer(base.tokenizer, vocab, GrammarLimits(compile_workers=1)))

    async def compile(schema: dict):
        return await sandbox.compile("a", "json_schema", {"schema": schema}, "response_format schema")

    try:
        with pytest.raises(GrammarError, match="the schema cannot be used for constrained decoding: ValueError"):
            asyncio.run(compile({"type": "number", "minimum": 10**300}))
        (worker,) = sandbox._workers
        asyncio.run(compile({"type": "object"}))
        assert sandbox._workers == [worker] and worker.alive, "the same worker compiles the next schema"
    finally:
        sandbox.close()


def prompt(ids: list[int]) -> Example:
    tensor = torch.tensor(ids)
    return Example(tensor, torch.full_like(tensor, IGNORE_INDEX), None)


def test_a_mask_later_than_the_budget_is_reported_and_the_other_rows_masks_are_not_held(tiny_grammars):
    base, vocab = tiny_grammars
    # llguidance's item limit raised, so that this grammar is slow rather than stopped: the first
    # mask of a fresh matcher for it takes ~100 ms (measured), twenty times the 5 ms budget
    slow = Grammars.for_tokenizer(base.tokenizer, vocab, GrammarLimits(max_items_in_row=10**6, step_max_items=10**8))
    fast = Grammars.for_tokenizer(base.tokenizer, vocab)
    late_row = Row(None, None, 0, 0, 0, grammar=slow.matcher(slow.json_schema(optional_properties(3000))))
    plain_row = Row(None, None, 0, 1, 0)
    quick_row = Row(None, None, 0, 2, 0, grammar=fast.matcher(fast.json_schema({"type": "object"})))
    masks = MaskWorkers(vocab, threads=2, budget_s=0.005)
    try:
        masks.start([late_row, plain_row, quick_row])
        time.sleep(0.002)  # what little a step's forward would give it
        started = time.perf_counter()
        bitmask, failed = masks.gather([late_row, plain_row, quick_row])
        waited = time.perf_counter() - started
    finally:
        masks.close()
    assert list(failed) == [late_row]
    message, client_error = failed[late_row]
    assert client_error and "within the server's budget of 5 ms" in message
    assert waited < 0.05, f"the step waited {waited * 1000:.0f} ms for a 5 ms budget"
    assert bool((bitmask[1] == -1).all()), "a row without a grammar may take any token"
    assert not bool((bitmask[2] == -1).all()), "the quick row's mask arrived in time"


def test_a_row_whose_mask_stops_on_an_llguidance_limit_fails_alone_as_the_requests_fault(tiny_grammars):
    base, _ = tiny_grammars
    # 100 units of lexer fuel per step: the mask once the value's string has opened needs more
    engine = Engine(base, LoRAFleet(base.model), grammar_limits=GrammarLimits(step_lexer_fuel=100))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    grammar = engine.grammars.json_schema(schema)
    plain = engine.submit(prompt([5, 6, 7]), None, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    stopped = engine.submit(prompt([8, 9]), None, SamplingParams(max_tokens=12, temperature=0, grammar=grammar))
    engine.run_until_idle()
    failed = list(stopped)[-1]
    assert failed.finish_reason == "error" and failed.client_error, failed
    assert failed.error.startswith("the requested structure (response_format or tools) is too complex to follow")
    final = list(plain)[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 6


def test_a_grammar_stopped_by_an_llguidance_limit_mid_reply_is_the_requests_fault(tiny_grammars):
    base, _ = tiny_grammars
    engine = Engine(base, LoRAFleet(base.model), grammar_limits=GrammarLimits(mask_budget_ms=10_000))
    grammar = engine.grammars.json_schema(optional_properties(1500))  # past max_items_in_row once a key opens
    plain = engine.submit(prompt([5, 6, 7]), None, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    stopped = engine.submit(prompt([8, 9]), None, SamplingParams(max_tokens=12, temperature=0, grammar=grammar))
    engine.run_until_idle()
    failed = list(stopped)[-1]
    assert failed.finish_reason == "error" and failed.client_error, failed
    assert "too complex to follow" in failed.error and "simplify it" in failed.error
    assert list(plain)[-1].finish_reason == "length"
