"""The engine's own decode speed: what `lorafleet compress` reports beside each compressed model."""

from __future__ import annotations

import time

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example
from lorafleet.models.loading import FrozenBase
from lorafleet.serve.engine.engine import Engine
from lorafleet.serve.engine.sampling import SamplingParams


def decode_speed(base: FrozenBase, prompts: list[Example], streams: int = 16, tokens: int = 16) -> float:
    """Greedy decode tokens/s of this engine on `base` (no adapters): `streams` of the prompts at
    once, `tokens` each, after a warm-up. The model is left as it was (no weight fusion)."""
    engine = Engine(base, LoRAFleet(base.model), max_batch=streams, fuse_weights=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    batch = [prompts[i % len(prompts)] for i in range(streams)]
    engine.submit(batch[0], None, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    started = time.perf_counter()
    replies = [engine.submit(prompt, None, params) for prompt in batch]
    engine.run_until_idle()
    seconds = time.perf_counter() - started
    return sum(list(reply)[-1].completion_tokens for reply in replies) / seconds
