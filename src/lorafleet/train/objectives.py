"""Training objectives: SFT, DPO and MPO, one object per adapter job.

An objective is everything that differs between adapters that learn from answers (SFT) and
adapters that learn from preference pairs (DPO, MPO): the records it loads, the sequences a
micro-batch puts in the fleet batch, the segments a loss is taken over, its loss from their mean
losses, its data-parallel share, what it adds to the memory model, and its held-out measure. The
trainer, the step layout, admission and held-out evaluation call it and never ask which one it is.
(A variant of the adapter itself, such as DoRA's magnitudes or LoRA+'s learning rate per
parameter group, belongs to the adapter and its optimizer entry, not here.)

The preference objectives are functions of summed log-probabilities of each answer (its label
tokens: the answer and its end-of-turn token) under the policy (base + adapter) and under the
reference (the base with the adapter off, or the adapter's frozen `init_from` weights):

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

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.config import MPO_LOSS_WEIGHTS, AdapterSpec, FleetSpec
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import Example
from lorafleet.data.preference import PreferencePair, load_preference_pairs
from lorafleet.models.loading import FrozenBase
from lorafleet.segments import Segment
from lorafleet.train.scoring import answer_rows, answer_segments, label_count

TERMS = {"dpo": ("sigmoid",), "mpo": ("sigmoid", "bco_pair", "sft")}
# What a preference step reports besides its loss, in this order (metrics.jsonl keys)
STATISTICS = ("reward_margin", "reward_accuracy")


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


@dataclass
class MicroBatch:
    """One active adapter's part of a fleet step, in the order of the step's jobs: what its
    objective scores."""

    drawn: list  # the micro-batch it drew: examples, or preference pairs (every process's)
    items: list  # this process's share of them (all of them on one process)
    tokens: int  # real tokens of the whole micro-batch: what its job counts
    scored: int  # how many of the step's scored segments are its own, in order
    answer_tokens: torch.Tensor | None = None  # pairs: label tokens of each answer (on the device)
    share: float | tuple[float, float] | None = None  # data-parallel: this process's part of each mean
    references: torch.Tensor | None = None  # pairs: reference log-probabilities of each answer


class SFT:
    """Supervised fine-tuning: the mean cross-entropy over the adapter's answer tokens."""

    needs_reference = False  # torchtune's `is_reference_free`, the other way round
    reference_route: str | None = None
    metric_names: tuple[str, ...] = ()  # what its step reports after its loss
    held_out_names = ("eval_loss",)

    def __init__(self, spec: AdapterSpec) -> None:
        self.spec = spec

    def load(self, path: str | Path, base: FrozenBase, fleet: FleetSpec) -> tuple[list[Example], list[str]]:
        """Its records in `path` (its data or its held-out file), and the bad ones it skipped."""
        return load_examples(path, base, fleet.max_tiles, fleet.max_seq_len, self.spec.skip_bad_records)

    def rows(self, examples: list[Example]) -> list[Example]:
        """The sequences a micro-batch puts in the fleet batch."""
        return examples

    def tokens(self, examples: list[Example]) -> int:
        return sum(example.num_tokens for example in examples)

    def longest(self, examples: list[Example]) -> int:
        return max(example.num_tokens for example in examples)

    @property
    def rows_per_micro_batch(self) -> int:
        return self.spec.micro_batch_size

    def loss_segments(self, segment: Segment, rows: list[Example], packed: bool) -> list[Segment]:
        """What its losses are taken over: its whole segment, one mean over every answer token."""
        return [segment]

    def answer_tokens(self, rows: list[Example], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def share(self, mine: list[Example], whole: list[Example]) -> float:
        """Data-parallel: this process's part of the micro-batch's mean, its share of the label tokens."""
        total = sum(label_count(example) for example in whole)
        return sum(label_count(example) for example in mine) / max(total, 1)

    def loss(
        self, losses: list[torch.Tensor], part: MicroBatch, computed_in: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Its loss from the mean losses of its scored segments, and the statistics its step reports."""
        loss = losses[0]
        return (loss if part.share is None else loss * part.share), None


class DPO:
    """Direct preference optimisation: pairs of answers, the sigmoid term against a reference."""

    needs_reference = True
    held_out_names = ("eval_loss", "eval_reward_margin", "eval_reward_accuracy")

    def __init__(self, spec: AdapterSpec) -> None:
        self.spec = spec

    @property
    def metric_names(self) -> list[str]:
        return metric_names(self.spec)

    @property
    def reference_route(self) -> str | None:
        """Where its reference rows go: the base alone (None), or its frozen initial weights."""
        # ":" is in no adapter name (config.ADAPTER_NAME), so the reference never meets a real adapter
        return f"{self.spec.name}:reference" if self.spec.reference == "init" else None

    def load(self, path: str | Path, base: FrozenBase, fleet: FleetSpec) -> tuple[list[PreferencePair], list[str]]:
        return load_preference_pairs(path, base, fleet.max_tiles, fleet.max_seq_len, self.spec.skip_bad_records)

    def rows(self, pairs: list[PreferencePair]) -> list[Example]:
        """A micro-batch of m pairs is 2m sequences: [chosen_1..m, rejected_1..m]."""
        return answer_rows(pairs)

    def tokens(self, pairs: list[PreferencePair]) -> int:
        return sum(pair.num_tokens for pair in pairs)

    def longest(self, pairs: list[PreferencePair]) -> int:
        return max(pair.longest for pair in pairs)

    @property
    def rows_per_micro_batch(self) -> int:
        return 2 * self.spec.micro_batch_size

    def loss_segments(self, segment: Segment, rows: list[Example], packed: bool) -> list[Segment]:
        """One segment per answer: each answer's summed log-probability is its mean loss times its tokens."""
        return answer_segments(segment, rows, packed)

    def answer_tokens(self, rows: list[Example], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        counts = torch.tensor([label_count(example) for example in rows], dtype=dtype)
        return counts.to(device, non_blocking=True)

    def share(self, mine: list[PreferencePair], whole: list[PreferencePair]) -> tuple[float, float]:
        """Data-parallel: this process's share of the pairs, and of the chosen answers' label tokens
        (MPO's SFT term is a mean over those)."""
        chosen = sum(label_count(pair.chosen) for pair in mine)
        return len(mine) / len(whole), chosen / max(sum(label_count(pair.chosen) for pair in whole), 1)

    def loss(
        self, losses: list[torch.Tensor], part: MicroBatch, computed_in: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = part.answer_tokens
        logps = AnswerLogProbs(-torch.stack(losses) * tokens, part.references, tokens, computed_in)
        if part.share is None:
            return preference_loss(self.spec, logps)
        return self.shared_loss(logps, *part.share)

    def shared_loss(
        self, logps: AnswerLogProbs, pair_share: float, token_share: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-parallel: this process's part of the objective and its statistics, each a mean over
        pairs scaled by this process's share of them."""
        scale = self._statistics_scale(pair_share, token_share)
        loss, statistics = preference_loss(self.spec, logps)
        return loss * pair_share, statistics * scale.to(statistics.device, statistics.dtype)

    def _statistics_scale(self, pair_share: float, token_share: float) -> torch.Tensor:
        # float64 on the host: a share such as 1/3 is rounded once, to the statistics' dtype, not to float32 first
        names = self.metric_names
        return torch.tensor([token_share if name == "loss_sft" else pair_share for name in names], dtype=torch.float64)

    def held_out_sums(self, logps: AnswerLogProbs, pairs: int) -> torch.Tensor:
        """Its held-out measure of a micro-batch of `pairs` pairs: loss, reward margin and reward
        accuracy, weighted by pairs (summed over micro-batches, then divided by every pair)."""
        loss, statistics = preference_loss(self.spec, logps)
        return torch.cat([loss.detach()[None], statistics[-2:]]) * pairs


class MPO(DPO):
    """Mixed preference optimisation (InternVL's post-training): DPO's sigmoid term, the BCO pair
    term and SFT on the chosen answers, weighted."""

    def shared_loss(
        self, logps: AnswerLogProbs, pair_share: float, token_share: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair terms are means over pairs, the SFT term a mean over the chosen answers' tokens:
        each is scaled by this process's share of its own count."""
        scale = self._statistics_scale(pair_share, token_share)
        preference, quality, generation = self.spec.loss_weights or MPO_LOSS_WEIGHTS
        pair_terms = dataclasses.replace(self.spec, loss_weights=[preference, quality, 0.0])
        loss, statistics = preference_loss(pair_terms, logps)
        sft, _ = preference_loss(dataclasses.replace(self.spec, loss_weights=[0.0, 0.0, generation]), logps)
        return loss * pair_share + sft * token_share, statistics * scale.to(statistics.device, statistics.dtype)


Objective = SFT | DPO | MPO
OBJECTIVES = {"sft": SFT, "dpo": DPO, "mpo": MPO}


def objective_for(spec: AdapterSpec) -> Objective:
    return OBJECTIVES[spec.objective](spec)
