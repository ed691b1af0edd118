"""Engine behaviour the gateway relies on: failures stay with the request that caused them, and
each stream says when its first token was chosen (time to first token)."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time

import torch

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.sampling import SamplingParams


def prompt(ids: list[int]) -> Example:
    tensor = torch.tensor(ids)
    return Example(tensor, torch.full_like(tensor, IGNORE_INDEX), None)


def test_each_stream_says_when_its_first_token_was_chosen(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    submitted = time.perf_counter()
    first = engine.submit(prompt([5, 6, 7]), None, params)
    assert first.first_token_at is None
    engine._iteration()  # prefilled: its first token is chosen
    chosen = first.first_token_at
    assert chosen is not None and submitted < chosen < time.perf_counter()
    later = engine.submit(prompt([8, 9]), None, params)
    engine.run_until_idle()
    assert first.first_token_at == chosen, "stamped at the first token, not at every token"
    assert later.first_token_at is not None and chosen < later.first_token_at
    assert [list(stream)[-1].completion_tokens for stream in (first, later)] == [4, 4]


def test_a_request_for_an_unloaded_adapter_fails_alone(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model)
    fleet.add_adapter("gone", LoRAShape(2, 4.0, 0.0, find_target_modules(base.model, "", ["q_proj"])))
    engine = Engine(base, fleet)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    healthy = engine.submit(prompt([5, 6, 7]), None, params)
    doomed = engine.submit(prompt([8, 9]), "gone", params)
    fleet.remove_adapter("gone")  # as an admin unload racing with the request would
    engine.run_until_idle()
    assert list(doomed)[-1].finish_reason == "error"
    final = list(healthy)[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 5


def test_a_prompt_that_breaks_prefill_does_not_stop_running_requests(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    running = engine.submit(prompt([5, 6, 7]), None, params)
    engine._iteration()  # the first request is now decoding
    broken = engine.submit(prompt([10**9]), None, params)  # token id outside the vocabulary
    beside = engine.submit(prompt([8, 9]), None, params)  # arrives with it: prefilled in the same batch
    engine.run_until_idle()
    assert list(broken)[-1].finish_reason == "error"
    assert list(running)[-1].completion_tokens == 6
    assert list(beside)[-1].completion_tokens == 6, "a broken prompt fails alone, not its admission batch"


def poison(base, token: int) -> None:
    """Make `token`'s embedding NaN: any row that feeds it gets non-finite logits (the output head
    is untied first, or every row's logit for `token` would be NaN too)."""
    head = base.model.get_output_embeddings()
    if head.weight is base.model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        base.model.get_input_embeddings().weight[token] = float("nan")


def greedy_tokens(base, ids: list[int], count: int) -> list[int]:
    ids = list(ids)
    for _ in range(count):
        with torch.no_grad():
            ids.append(int(base.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_a_row_with_non_finite_logits_fails_alone_at_prefill_and_in_decode(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    healthy_tokens = greedy_tokens(base, [5, 6, 7], 6)
    doomed_first = greedy_tokens(base, [8, 9, 10, 11], 1)[-1]  # fed at the doomed row's first decode step
    assert doomed_first not in healthy_tokens and 399 not in healthy_tokens, "the test needs disjoint tokens"
    engine = Engine(base, LoRAFleet(base.model))
    healthy = engine.submit(prompt([5, 6, 7]), None, params)
    engine._iteration()
    running = engine.submit(prompt([8, 9, 10, 11]), None, params)
    engine._iteration()  # prefilled: its first token is sampled, not yet fed
    poison(base, doomed_first)
    poison(base, 399)
    at_prefill = engine.submit(prompt([12, 399, 13]), None, params)
    engine.run_until_idle()
    for doomed in (running, at_prefill):
        final = list(doomed)[-1]
        assert final.finish_reason == "error" and "non-finite" in final.error
    final = list(healthy)[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 6


def test_a_seeded_reply_is_the_same_whoever_shares_the_batch(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=2**64 - 1, ignore_eos=True)
    replies = []
    for companions in (0, 5):
        engine = Engine(base, LoRAFleet(base.model))
        for i in range(companions):
            engine.submit(prompt([20 + i, 21, 22]), None, SamplingParams(max_tokens=9, temperature=1.0))
        stream = engine.submit(prompt([5, 6, 7, 8]), None, params)
        engine.run_until_idle()
        events = list(stream)
        assert events[-1].finish_reason == "length"
        replies.append("".join(event.text for event in events))
    assert replies[0] == replies[1]


def test_a_prompt_longer_than_the_cache_is_refused_alone(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model), max_seq_len=16)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    long = engine.submit(prompt(list(range(5, 25))), None, params)
    short = engine.submit(prompt([5, 6, 7]), None, params)
    engine.run_until_idle()
    assert "at most 16" in list(long)[-1].error
    final = list(short)[-1]
    assert final.finish_reason == "length" and final.completion_tokens == 16 - 3 + 1  # the last is never fed


def count_prefilled_rows(base) -> list[int]:
    """A list that grows by one entry per prompt row the model prefills (a forward over a batch of
    token rows; a decode step embeds one token per row, a flat tensor)."""
    rows: list[int] = []

    def record(module, args) -> None:
        if args[0].dim() == 2:
            rows.extend([1] * args[0].shape[0])

    base.model.get_input_embeddings().register_forward_pre_hook(record)
    return rows


def closed_loop() -> asyncio.AbstractEventLoop:
    """An event loop that has closed, as a server's does at shutdown: a stream handing events to it
    raises in the engine's thread."""
    loop = asyncio.new_event_loop()
    loop.close()
    return loop


def test_a_row_whose_output_fails_at_admission_fails_alone_and_starts_once(tiny_lm_dir):
    """Rows of one admission batch: one whose stop string breaks detokenising, one whose reader's
    event loop has closed, beside two healthy ones, with every slot taken (a second start of any
    of them would find none)."""
    base = load_base(tiny_lm_dir)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    first, second = [5, 6, 7], [12, 13, 14]
    expected = [greedy_text(base, ids, 5) for ids in (first, second)]
    prefilled = count_prefilled_rows(base)
    engine = Engine(base, LoRAFleet(base.model), max_batch=4)
    healthy = [engine.submit(prompt(first), None, params)]
    broken_stop = engine.submit(prompt([8, 9]), None, dataclasses.replace(params, stop=(b"never",)))
    engine.submit(prompt([10, 11]), None, params, closed_loop())
    healthy.append(engine.submit(prompt(second), None, params))
    engine.run_until_idle()
    (error,) = drain(broken_stop)
    assert error.finish_reason == "error" and "TypeError" in error.error
    for stream, text in zip(healthy, expected, strict=True):
        events = drain(stream)
        assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + ["length"]
        assert events[-1].completion_tokens == 5 and "".join(e.text for e in events) == text
    assert len(prefilled) == 4, "every request prefilled exactly once"
    assert engine.running == 0 and engine.cache.free_slots == 4, "every slot freed, none twice"


def greedy_text(base, ids: list[int], count: int) -> str:
    return base.tokenizer.decode(greedy_tokens(base, ids, count)[len(ids) :], skip_special_tokens=True)


def test_a_row_whose_output_fails_in_decode_fails_alone(tiny_lm_dir):
    """A reader goes away while its row decodes: that row ends, the rows beside it go on."""
    base = load_base(tiny_lm_dir)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = Engine(base, LoRAFleet(base.model), max_batch=3)
    healthy = engine.submit(prompt([5, 6, 7]), None, params)
    loop = asyncio.new_event_loop()
    engine.submit(prompt([8, 9]), None, params, loop)
    engine._iteration()  # both admitted; the first token's event is queued on the open loop
    loop.close()  # the reader goes away: the next event cannot be handed over
    beside = engine.submit(prompt([12, 13, 14]), None, params)
    engine.run_until_idle()
    for stream in (healthy, beside):
        events = drain(stream)
        assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + ["length"]
        assert events[-1].completion_tokens == 6
    assert engine.running == 0 and engine.cache.free_slots == 3


def drain(stream) -> list:
    """Every event a (thread-queue) stream holds."""
    events = []
    while True:
        try:
            events.append(stream.get(timeout=0))
        except queue.Empty:
            return events


def test_requests_wait_in_the_queue_until_the_engine_admits_them(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model))  # not started: nothing is admitted yet
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.submit(prompt([5, 6, 7]), None, params)
    engine.submit(prompt([8, 9]), None, params)
    assert (engine.waiting, engine.running) == (2, 0)
    engine.run_until_idle()
    assert (engine.waiting, engine.running) == (0, 0)


def test_admission_takes_tenants_in_turn_not_first_come_first_served(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model), max_batch=1)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)  # each ends at its prefill
    streams = {}
    for tenant, count in (("a", 3), ("b", 3), ("c", 1)):
        streams |= {(tenant, i): engine.submit(prompt([5, 6, 7]), None, params, tenant=tenant) for i in range(count)}
    started: list[tuple[str, int]] = []
    for _ in range(len(streams)):  # one row: one request admitted per iteration
        engine._iteration()
        started += [name for name, stream in streams.items() if stream.first_token_at and name not in started]
    assert [tenant for tenant, _ in started] == ["a", "b", "c", "a", "b", "a", "b"]


def test_a_tenant_flooding_the_engine_holds_at_most_its_rows_and_another_starts_at_once(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    engine = Engine(base, LoRAFleet(base.model), max_batch=4, max_rows_per_tenant=3)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    flood = [engine.submit(prompt([5, 6, 7]), None, params, tenant="hostile") for _ in range(20)]
    victim = engine.submit(prompt([8, 9]), None, params, tenant="victim")
    engine._iteration()  # one admission
    assert victim.first_token_at is not None, "started at the first admission, behind 20 of another tenant's"
    assert engine.running == 4 and sum(stream.first_token_at is not None for stream in flood) == 3
    engine.run_until_idle()
    assert [list(stream)[-1].completion_tokens for stream in [*flood, victim]] == [3] * 21
