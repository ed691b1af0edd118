"""Sampling on the device: the distribution of softmax(logits / T) within the top-p nucleus,
reproducible per seed and independent of the rows beside it, greedy at (near) zero temperature."""

from __future__ import annotations

import math

import torch

from lorafleet.serve.engine.device_sampling import finite_rows, sample_rows


def draw(logits: torch.Tensor, temperature: float, top_p: float, seeds: range, position: int = 7) -> torch.Tensor:
    rows = len(seeds)
    return sample_rows(
        logits.expand(rows, -1).float(),
        torch.full((rows,), temperature),
        torch.full((rows,), top_p),
        torch.tensor(list(seeds)),
        torch.full((rows,), position),
    )


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_draws_follow_the_softmax_distribution():
    tokens = draw(PROBS.log()[None], 1.0, 1.0, range(20000))
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(frequencies, PROBS, atol=0.015), frequencies


def test_top_p_keeps_the_smallest_set_reaching_it_and_renormalises():
    tokens = draw(PROBS.log()[None], 1.0, 0.7, range(20000))  # 0.5 + 0.3 reach 0.7: tokens 0 and 1
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert frequencies[2:].sum() == 0
    assert math.isclose(frequencies[0].item(), 0.5 / 0.8, abs_tol=0.015)


def test_temperature_sharpens_and_near_zero_is_greedy():
    sharp = draw(PROBS.log()[None], 0.25, 1.0, range(5000))
    assert (sharp == 0).float().mean() > 0.8
    for temperature in (0.0, 8e-39, 5e-324, 1e-6):  # underflow-sized temperatures must not give NaN
        assert draw(PROBS.log()[None], temperature, 0.9, range(50)).eq(0).all()


def test_a_draw_depends_on_seed_and_position_only():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    alone = draw(logits, 1.0, 0.95, range(5, 6), position=40)
    among_others = draw(logits, 1.0, 0.95, range(0, 64), position=40)[5:6]
    assert torch.equal(alone, among_others)
    assert len(set(draw(logits, 1.0, 1.0, range(1), position=p).item() for p in range(30))) > 10


def test_rows_with_non_finite_logits_are_flagged():
    logits = torch.randn(3, 10)
    logits[1, 4] = float("nan")
    logits[2, 0] = float("inf")
    assert finite_rows(logits).tolist() == [True, False, False]


def test_the_device_sampler_draws_what_the_reference_sampler_draws():
    """sampling.sample_next_token is the plain reference (one row, a host generator): over many
    draws both give the same tokens with the same frequencies, with and without top-p."""
    from lorafleet.serve.engine.sampling import SamplingParams, sample_next_token

    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    for temperature, top_p in ((0.8, 1.0), (1.3, 0.6)):
        params = SamplingParams(temperature=temperature, top_p=top_p)
        generator = torch.Generator().manual_seed(0)
        reference = torch.tensor([sample_next_token(logits[0], params, generator) for _ in range(6000)])
        ours = draw(logits, temperature, top_p, range(6000))
        want = torch.bincount(reference, minlength=12).float() / 6000
        got = torch.bincount(ours, minlength=12).float() / 6000
        assert set(reference.tolist()) == set(ours.tolist())
        assert torch.allclose(got, want, atol=0.025), (got, want)
