"""Choosing every row's next token on the device, in one batched pass with static shapes.

The semantics are `sampling.sample_next_token`'s: greedy at temperature 0, else a draw from
softmax(logits / T) restricted to the smallest set of tokens whose probability reaches top_p. The
draw is a Gumbel-max over counter-based uniforms: u = hash(seed, position, token), so a row's
reply depends only on its own seed, prompt and adapter — not on the rows decoded beside it, nor on
the order the engine happens to run them in — and no host random generator (nor any
synchronisation) is involved. A captured CUDA graph can hold the whole of it.

A row under a grammar (structured output, forced tool calls) brings a bitmask of the tokens it may
take next (`allowed_tokens`), applied before greedy and sampled choice alike. Log-probabilities,
when asked for, are the model's own (log-softmax of the raw logits, before temperature or mask),
as OpenAI and vLLM report them.

Temperatures below `MIN_TEMPERATURE` decode greedily: logits / 1e-38 overflow to inf and the
softmax to NaN, and at 1e-4 the distribution is already a point mass in fp32.
"""

from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-4
_MASK32 = 0xFFFFFFFF


MODES = ("greedy", "sample", "nucleus")
LOGPROBS_TOP = 20  # alternatives computed per token when any row asks for logprobs (OpenAI's maximum)


def sampling_mode(temperature: list[float], top_p: list[float]) -> str:
    """The least work that serves these rows: all greedy; sampling without top-p; or top-p too."""
    warm = [p for t, p in zip(temperature, top_p, strict=True) if t >= MIN_TEMPERATURE]
    if not warm:
        return "greedy"
    return "nucleus" if any(p < 1.0 for p in warm) else "sample"


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    mode: str = "nucleus",
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rows,) next tokens for logits (rows, vocab) in fp32; temperature and top_p (rows,) float,
    seeds and positions (rows,) int64 (seed below 2**32). `mode` (from `sampling_mode`) skips the
    work no row needs: "greedy" (every row cold), "sample" (no row with top_p < 1). `allowed`
    (rows, vocab) bool, when given: the only tokens each row may take."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.inf)
    greedy = logits.argmax(dim=-1)
    if mode == "greedy":
        return greedy
    nucleus = mode == "nucleus"
    cold = temperature < MIN_TEMPERATURE
    scaled = logits / torch.where(cold, 1.0, temperature)[:, None]
    if nucleus:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, _ = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        kept = before < top_p[:, None]
        smallest = torch.where(kept, sorted_probs, torch.inf).amin(dim=-1, keepdim=True)
        scaled = scaled.masked_fill(probs < smallest, -torch.inf)
    drawn = (scaled + _gumbel(seeds, positions, logits.shape[-1], logits.device)).argmax(dim=-1)
    return torch.where(cold, greedy, drawn)


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) bool from a (rows, ceil(vocab / 32)) int32 bitmask, bit t % 32 of word t // 32
    set when token t is allowed (the layout grammar libraries fill)."""
    token = torch.arange(vocab, device=bitmask.device)
    words = bitmask.index_select(1, token // 32)
    return ((words >> (token % 32).to(torch.int32)) & 1).bool()


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, top: int = LOGPROBS_TOP) -> torch.Tensor:
    """(rows, 1 + 2·top) float32: the chosen token's log-probability, the `top` most likely tokens'
    log-probabilities, and their ids (exact as floats below 2**24)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return torch.cat([logprobs.gather(1, ids[:, None]), best.values, best.indices.float()], dim=1)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: the row's logits are all finite (a row that is not retires with an error)."""
    return torch.isfinite(logits).all(dim=-1)


def _gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    token = torch.arange(vocab, device=device)
    x = _mix(seeds[:, None] & _MASK32)
    x = _mix(x ^ (positions[:, None] & _MASK32))
    x = _mix(x ^ token[None, :])
    return -torch.log(_minus_log_uniform(x >> 8))


def _minus_log_uniform(bits: torch.Tensor) -> torch.Tensor:
    """-log(u) for u = (bits + 0.5) / 2**24 (24 random bits: u strictly inside (0, 1)), never 0.

    float32 holds u exactly only below 1/2: above, bits + 0.5 rounds, and the largest u to 1.0,
    whose -log(-log u) is +inf: that token was drawn whatever its logit, and one a grammar masks
    (-inf + inf = NaN, which argmax takes) was drawn against the mask. Above 1/2 this takes
    -log1p(-(1 - u)) instead: 1 - u = (2**24 - 1 - bits + 0.5) / 2**24 is exact there."""
    low = (bits.to(torch.float32) + 0.5) / float(1 << 24)
    high = (((1 << 24) - 1 - bits).to(torch.float32) + 0.5) / float(1 << 24)  # 1 - u
    return torch.where(bits < (1 << 23), -torch.log(low), -torch.log1p(-high))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser, in int64 arithmetic that never overflows."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 32-bit x: in 16-bit halves, so no product passes 2**48."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & _MASK32
