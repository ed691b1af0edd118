"""The static decode step gives the logits (and greedy tokens) the model's own forward gives, with
every adapter, rows in any slots; its shapes never change within a bucket; the CUDA graph replays
exactly the eager step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.segments import Segment
from lorafleet.serve.engine.decode import GraphDecoder, StaticDecoder, StepKind, prefill
from lorafleet.serve.engine.kv_cache import SlotKVCache

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def example(ids: list[int]) -> Example:
    tensor = torch.tensor(ids)
    return Example(tensor, torch.full_like(tensor, IGNORE_INDEX), None)


def fleet_with_adapters(base) -> LoRAFleet:
    """Adapter a on every projection (rank 8), b on some (rank 4), both with visible weights."""
    fleet = LoRAFleet(base.model)
    for name, rank, targets, seed in (("a", 8, ALL, 1), ("b", 4, ["q_proj", "v_proj", "up_proj"], 2)):
        fleet.add_adapter(name, LoRAShape(rank, 2 * rank, 0.0, find_target_modules(base.model, "", targets)))
        with torch.no_grad():
            for _, weight in fleet.named_weights(name):
                weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return fleet


def decode_greedily(base, fleet, prompts, adapters, slots, steps, cache=None, decoder=None):
    """Prefill the prompts into `slots`, then `steps` greedy decode steps; per step the logits-argmax
    tokens of every row (as the engine runs it, with the routing's adapter slots)."""
    cache = cache or SlotKVCache.for_model(base.language_model, 8, 64, base.dtype, base.device)
    decoder = decoder or GraphDecoder(base, cache, graphs=False)
    order = sorted(range(len(prompts)), key=lambda i: adapters[i] or "")
    segments, start = [], 0
    for i in order:
        segments.append(Segment(adapters[i], start, start + 1))
        start += 1
    with fleet.route(segments):
        logits, keys, values = prefill(base, [example(prompts[i]) for i in order], base.device)
    cache.write_prompts([slots[i] for i in order], keys, values, [len(prompts[i]) for i in order])
    tokens = [0] * len(prompts)
    for position, i in enumerate(order):
        tokens[i] = int(logits[position].argmax())
    produced = [list(tokens)]
    positions = [len(p) for p in prompts]
    for _ in range(steps - 1):
        rows = len(prompts)
        host = {"tokens": tokens, "slots": slots, "positions": positions,
                "adapters": [fleet.routing.slots.get(a, 0) for a in adapters],
                "temperature": [0.0] * rows, "top_p": [1.0] * rows, "seeds": [0] * rows}  # fmt: skip
        tokens, finite, _ = decoder.step(host, fleet.routing.slots)
        assert all(finite)
        cache.advance(slots)
        positions = [p + 1 for p in positions]
        produced.append(list(tokens))
    return produced


def reference_greedy(base, fleet, prompt, adapter, steps):
    """The model's own forward, one row alone with its adapter through the adapter layers."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with fleet.route([Segment(adapter, 0, 1)]), torch.no_grad():
            logits = base.model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_static_decode_equals_the_model_with_every_adapter_in_any_slot(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    fleet = fleet_with_adapters(base)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (5, 9, 6, 4)]
    adapters = ["b", "a", None, "a"]
    slots = [6, 0, 3, 7]  # rows live in any slots, not 0..n-1
    produced = decode_greedily(base, fleet, prompts, adapters, slots, steps=6)
    for row, prompt in enumerate(prompts):
        assert [step[row] for step in produced] == reference_greedy(base, fleet, prompt, adapters[row], 6)


def test_the_adapter_stacks_follow_a_reload_under_the_same_name(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    fleet = fleet_with_adapters(base)
    cache = SlotKVCache.for_model(base.language_model, 4, 64, base.dtype, base.device)
    decoder = GraphDecoder(base, cache, graphs=False)
    prompts, adapters, slots = [[7, 8, 9, 10]], ["b"], [1]
    decode_greedily(base, fleet, prompts, adapters, slots, 3, cache, decoder)
    fleet.remove_adapter("b")
    fleet.add_adapter("b", LoRAShape(16, 32.0, 0.0, find_target_modules(base.model, "", ALL)))
    with torch.no_grad():
        for _, weight in fleet.named_weights("b"):
            weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    cache.release(1)
    produced = decode_greedily(base, fleet, prompts, adapters, slots, 5, cache, decoder)
    assert [step[0] for step in produced] == reference_greedy(base, fleet, prompts[0], "b", 5)


class Signatures(TorchDispatchMode):
    """Every (operation, input shapes) the step issues."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.seen[(str(func), shapes)] += 1
        return func(*args, **(kwargs or {}))


def test_the_step_is_static_its_signatures_do_not_grow_with_tokens(tiny_lm_dir):
    """The CPU stand-in for "capturable": within a (rows, span) bucket every step issues exactly the
    same operations on exactly the same shapes, however many tokens were generated; a whole
    generation sees no more distinct step signatures than span buckets."""
    base = load_base(tiny_lm_dir)
    fleet = fleet_with_adapters(base)
    cache = SlotKVCache.for_model(base.language_model, 8, 256, base.dtype, base.device)
    decoder = StaticDecoder(base, cache)
    decoder.refresh_adapters(fleet.routing.slots)
    rows, per_step = 5, []
    inputs = {
        "tokens": torch.full((8,), 11), "slots": torch.tensor([2, 0, 5, 1, 7, 8, 8, 8]),
        "positions": torch.tensor([3, 9, 4, 6, 5, 0, 0, 0]), "adapters": torch.tensor([1, 2, 0, 1, 2, 0, 0, 0]),
        "temperature": torch.tensor([0.0, 0.7, 1.0, 0.0, 0.3, 0, 0, 0]),
        "top_p": torch.tensor([1, 0.9, 1, 1, 0.5, 1, 1, 1]),
        "seeds": torch.arange(8),
    }  # fmt: skip
    spans = []
    for _ in range(60):
        span = cache.span(inputs["slots"][:rows].tolist())
        with Signatures() as signatures:
            inputs["tokens"] = decoder.step(inputs, span, StepKind("nucleus"))[0][0]
        per_step.append((span, frozenset(signatures.seen.items())))
        cache.advance(inputs["slots"][:rows].tolist())
        inputs["positions"] = inputs["positions"] + torch.tensor([1] * rows + [0] * 3)
        spans.append(span)
    by_span = {}
    for span, signature in per_step:
        by_span.setdefault(span, set()).add(signature)
    assert len(by_span) >= 2, "the generation must cross a span bucket for this to mean anything"
    assert all(len(signatures) == 1 for signatures in by_span.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_equals_the_eager_step_token_for_token(tiny_lm_dir):
    base = load_base(tiny_lm_dir, device="cuda", dtype=torch.bfloat16)
    fleet = fleet_with_adapters(base)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (5, 9, 6, 4, 12)]
    adapters, slots = ["b", "a", None, "a", "b"], [6, 0, 3, 7, 2]
    runs = []
    for graphs in (False, True):
        cache = SlotKVCache.for_model(base.language_model, 8, 128, base.dtype, base.device)
        decoder = GraphDecoder(base, cache, graphs=graphs)
        runs.append(decode_greedily(base, fleet, prompts, adapters, slots, 40, cache, decoder))
    assert runs[0] == runs[1]
    assert decoder._captured, "the graph path must actually have captured"
