"""Training objectives beyond SFT: DPO and MPO over preference pairs.

Everything is a function of summed log-probabilities of each answer (its label tokens: the answer
and its end-of-turn token) under the policy (base + adapter) and under the reference (the base
with the adapter off, or the adapter's frozen `init_from` weights):

  chosen_reward   = beta * (log pi(chosen)   - log ref(chosen))
  rejected_reward = beta * (log pi(rejected) - log ref(rejected))

  sigmoid  (DPO, Rafailov et al.):  -log sigmoid(chosen_reward - rejected_reward)
  bco_pair (the quality term):      -log sigmoid(chosen_reward) - log sigmoid(-rejected_reward)
  sft      (the generation term):   the chosen answers' mean negative log-likelihood per token

each averaged over the pairs of the micro-batch; the loss is their weighted sum: DPO is sigmoid
alone, MPO (InternVL's post-training objective) is 0.8 sigmoid + 0.2 bco_pair + 1.0 sft. These are
TRL's definitions (DPOTrainer with loss_type ["sigmoid"] and ["sigmoid", "bco_pair", "sft"]), and
tests/train/test_preference.py holds the fleet to TRL's losses and gradients. (TRL's answer also
takes what the template writes after the end-of-turn token, ChatML's newline; lorafleet's stops at
that token: data/encode.py's `end_of_turn` says why.)

The reward accuracy counts a pair as won when its margin chosen_reward - rejected_reward exceeds
what rounding alone can make of a tie (`rounding_noise`): the policy's and the reference's
log-probabilities come from batches of other shapes, so a policy equal to its reference (the first
step of `reference: init`) has margins of a few ulps either side of zero, which are not wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafleet.config import MPO_LOSS_WEIGHTS, AdapterSpec

TERMS = {"dpo": ("sigmoid",), "mpo": ("sigmoid", "bco_pair", "sft")}
# What a preference step reports besides its loss, in this order (metrics.jsonl keys)
STATISTICS = ("reward_margin", "reward_accuracy")


def is_preference(spec: AdapterSpec) -> bool:
    return spec.objective != "sft"


def loss_terms(spec: AdapterSpec) -> tuple[tuple[str, ...], tuple[float, ...]]:
    terms = TERMS[spec.objective]
    if spec.objective == "mpo":
        return terms, tuple(spec.loss_weights or MPO_LOSS_WEIGHTS)
    return terms, (1.0,)


def metric_names(spec: AdapterSpec) -> list[str]:
    """The numbers a preference adapter's step reports after its loss: each term, then STATISTICS."""
    return [f"loss_{term}" for term in loss_terms(spec)[0]] + list(STATISTICS)


@dataclass
class AnswerLogProbs:
    """Summed log-probabilities of a micro-batch's answers: pairs [chosen_1..m, rejected_1..m]."""

    policy: torch.Tensor  # (2m,), with gradients
    reference: torch.Tensor  # (2m,), constants
    tokens: torch.Tensor  # (2m,) label tokens per answer
    computed_in: torch.dtype = torch.float32  # the model's compute dtype: how finely they are known

    def halves(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return values.chunk(2)


def preference_loss(spec: AdapterSpec, logps: AnswerLogProbs) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's loss for one micro-batch, and its statistics (each term, reward margin,
    reward accuracy) as one detached tensor, read with the step's other numbers."""
    terms, weights = loss_terms(spec)
    chosen, rejected = logps.halves(logps.policy)
    reference_chosen, reference_rejected = logps.halves(logps.reference)
    chosen_reward = spec.beta * (chosen - reference_chosen)
    rejected_reward = spec.beta * (rejected - reference_rejected)
    values = []
    for term in terms:
        if term == "sigmoid":
            values.append(-F.logsigmoid(chosen_reward - rejected_reward).mean())
        elif term == "bco_pair":
            values.append((-F.logsigmoid(chosen_reward) - F.logsigmoid(-rejected_reward)).mean())
        else:  # sft: per token over all chosen answers of the micro-batch
            values.append(-chosen.sum() / logps.halves(logps.tokens)[0].sum())
    loss = sum(weight * value for weight, value in zip(weights, values, strict=True))
    margins = (chosen_reward - rejected_reward).detach()
    sizes = [values.detach() for values in (chosen, rejected, reference_chosen, reference_rejected)]
    accuracy = wins(margins, spec.beta * rounding_noise(logps.computed_in, *sizes)).mean()
    return loss, torch.stack([*values, margins.mean(), accuracy]).detach()


def rounding_noise(computed_in: torch.dtype, *logps: torch.Tensor) -> torch.Tensor:
    """How far rounding alone can move a sum or difference of the summed log-probabilities `logps`
    (elementwise), computed by a model whose compute dtype is `computed_in` (unit roundoff u).

    Two passes over batches of other shapes (the policy's rows beside other adapters' rows, the
    reference's in a pass of its own) round differently: a token's log-probability comes out up to
    one ulp, at most 2u of its size, apart. Every token's log-probability is <= 0, so the sizes add
    up to the size of the sum: an answer's summed log-probability moves by at most 2u |sum|, and a
    combination of such sums by at most 2u times the sum of their sizes. (float32: a margin of four
    sums of ~20 nats is noise within ~1e-5; bfloat16: within ~0.6.)"""
    unit_roundoff = torch.finfo(computed_in).eps / 2
    return 2 * unit_roundoff * sum(values.abs() for values in logps)


def wins(differences: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """1 where a difference (a reward margin, log p(chosen) - log p(rejected)) is a win: above what
    rounding can make of a tie (`noise`); 0 for losses, ties and differences within the noise."""
    return (differences > noise).to(differences.dtype)
