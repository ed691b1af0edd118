"""Sampling parameters, and the plain reference of choosing the next token: greedy, or
temperature and nucleus (top-p) sampling with a seed. The engine samples on the device
(device_sampling.py); tests/serve/test_sampling.py holds it to `sample_next_token`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorafleet.serve.engine.grammar import CompiledGrammar


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # same seed, same prompt, same adapter: same reply
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    # the reply must match it: a grammar's text (`grammar.Grammars` compiles one; trusted callers)
    # or one compiled already (`grammar.CompiledGrammar`, from the gateway's sandbox)
    grammar: str | CompiledGrammar | None = None
    logprobs: int | None = None  # report each token's log-probability and this many alternatives


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Semantics: argmax(logits) at temperature 0; otherwise a draw from softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches top_p."""
    if params.temperature == 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # mass before this token already enough
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
