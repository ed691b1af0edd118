"""Engine behaviour the gateway relies on: failures stay with the request that caused them."""

from __future__ import annotations

import torch

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.serve.engine import Engine
from lorafleet.serve.sampling import SamplingParams


def prompt(ids: list[int]) -> Example:
    tensor = torch.tensor(ids)
    return Example(tensor, torch.full_like(tensor, IGNORE_INDEX), None)


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
    engine.run_until_idle()
    assert list(broken)[-1].finish_reason == "error"
    assert list(running)[-1].completion_tokens == 6
