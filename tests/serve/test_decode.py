"""The lean decode step and its padding-free cache give the logits transformers gives."""

from __future__ import annotations

import torch

from lorafleet.data.encode import IGNORE_INDEX, Example
from lorafleet.models.loading import load_base
from lorafleet.serve.decode import Decoder, prefill


def example(ids: list[int]) -> Example:
    tensor = torch.tensor(ids)
    return Example(tensor, torch.full_like(tensor, IGNORE_INDEX), None)


def test_decode_steps_match_the_full_forward_for_rows_of_different_lengths(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (3, 11, 7)]
    follow = torch.randint(5, 400, (3, 4), generator=generator)
    decoder = Decoder(base)
    logits, cache = prefill(base, [example(p) for p in prompts[:2]], base.device)
    # A row joins later: caches of different capacities are merged, as the engine does.
    late_logits, late_cache = prefill(base, [example(prompts[2])], base.device)
    cache.extend(late_cache)
    steps = [torch.cat([logits, late_logits])]
    for column in range(follow.shape[1]):
        steps.append(decoder.step(follow[:, column], cache))
    for row, prompt in enumerate(prompts):
        full = torch.tensor(prompt + follow[row].tolist())[None]
        with torch.no_grad():
            reference = base.model(input_ids=full).logits[0, len(prompt) - 1 :]
        ours = torch.stack([step[row] for step in steps])
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    cache.select([2, 0])
    assert cache.lengths.tolist() == cache.host_lengths == [7 + 4, 3 + 4]


def test_fused_projections_match_the_adapter_layers_and_follow_adapter_reloads(tiny_lm_dir):
    from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
    from lorafleet.segments import Segment

    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model)
    everywhere = find_target_modules(
        base.model, "", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    some = find_target_modules(base.model, "", ["q_proj", "v_proj", "up_proj"])

    def add(name, rank, targets, seed):
        fleet.add_adapter(name, LoRAShape(rank, 2 * rank, 0.0, targets), seed=seed)
        with torch.no_grad():
            for _, weight in fleet.named_weights(name):
                weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))

    add("a", 8, everywhere, 1)
    add("b", 4, some, 2)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 400, (n,), generator=generator).tolist() for n in (5, 9, 6, 4)]
    segments = [Segment("a", 0, 2), Segment(None, 2, 3), Segment("b", 3, 4)]
    decoder = Decoder(base)
    token = torch.randint(5, 400, (4,), generator=generator)

    def decode_one_step():
        with fleet.route(segments):
            _, cache = prefill(base, [example(p) for p in prompts], base.device)
            return decoder.step(token, cache)

    for reload in (False, True):
        if reload:  # same name, other weights and targets: the fused weights must follow
            fleet.remove_adapter("b")
            add("b", 16, everywhere, 3)
        ours = decode_one_step()
        for row in range(len(prompts)):  # each row alone through the model's own adapter layers
            with fleet.route([Segment(segments_for_row(segments, row), 0, 1)]):
                with torch.no_grad():
                    reference = base.model(input_ids=torch.tensor([prompts[row] + [int(token[row])]])).logits[0, -1]
            torch.testing.assert_close(ours[row], reference, rtol=1e-4, atol=1e-4)


def segments_for_row(segments, row):
    return next(s.adapter for s in segments if s.start <= row < s.end)
