"""Greedy replies through the serving engine: the one way lorafleet generates to measure a model.

`lorafleet eval`, the demo's accuracy table and compression's report all decode here, so a score
is the reply `lorafleet serve` would give at temperature 0: every request is submitted to the
engine at once and the base and the adapters are decoded together in mixed batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example, encode_prompt
from lorafleet.data.records import ChatRecord
from lorafleet.errors import DataError
from lorafleet.eval.chat import exact_match_accuracy, reference_answers
from lorafleet.models.loading import FrozenBase
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.sampling import SamplingParams


@dataclass
class GreedyRequest:
    prompt: Example
    adapter: str | None  # None: the base alone
    label: str  # names the request when the engine fails it, e.g. "<question id> (<model>)"


@dataclass
class Decoded:
    replies: list[str] = field(default_factory=list)  # in request order, stripped
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def decode_greedy(
    base: FrozenBase,
    fleet: LoRAFleet,
    requests: Sequence[GreedyRequest],
    max_tokens: int,
    max_batch: int = 32,
    progress: bool = False,
    fuse_weights: bool = True,
) -> Decoded:
    """Every request's greedy reply, decoded together by the engine. `fuse_weights=False` leaves
    the model's own parameter storage alone, for a model that is used (pruned, saved) afterwards."""
    if not requests:
        return Decoded()
    longest = max(request.prompt.num_tokens for request in requests)
    engine = Engine(base, fleet, max_batch=max_batch, max_seq_len=longest + max_tokens, fuse_weights=fuse_weights)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    started = time.perf_counter()
    streams = [engine.submit(request.prompt, request.adapter, params) for request in requests]
    engine.start()
    decoded = Decoded()
    try:
        pairs = list(zip(requests, streams, strict=True))
        for request, stream in tqdm(pairs, desc="evaluating", unit="answer", disable=not progress):
            events = list(stream)
            if events[-1].finish_reason == "error":
                raise DataError(f"{request.label}: the engine failed: {events[-1].error}")
            decoded.replies.append("".join(event.text for event in events).strip())
            decoded.prompt_tokens += events[-1].prompt_tokens
            decoded.completion_tokens += events[-1].completion_tokens
    finally:
        engine.stop()
    decoded.seconds = time.perf_counter() - started
    return decoded


def generate_replies(
    base: FrozenBase,
    fleet: LoRAFleet,
    adapter: str | None,
    records: Sequence[ChatRecord],
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies of `adapter` (None: the base) to each record's prompt (its last assistant
    turn is dropped if present). The model is left as it was."""
    requests = [
        GreedyRequest(encode_prompt(_without_last_reply(record), base), adapter, f"{record.source} ({adapter})")
        for record in records
    ]
    return decode_greedy(base, fleet, requests, max_new_tokens, batch_size, fuse_weights=False).replies


def base_exact_match(base: FrozenBase, records: Sequence[ChatRecord]) -> float:
    """Exact-match accuracy of the model alone (no adapters) on held-out records, replied to
    greedily: what compression reports for each stage."""
    replies = generate_replies(base, LoRAFleet(base.model), None, records)
    return exact_match_accuracy(replies, reference_answers(records))


def _without_last_reply(record: ChatRecord) -> ChatRecord:
    if record.messages[-1].role != "assistant":
        return record
    return ChatRecord(record.messages[:-1], record.images, record.source)
