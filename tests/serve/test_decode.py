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
    cache.select(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [7 + 4, 3 + 4]
