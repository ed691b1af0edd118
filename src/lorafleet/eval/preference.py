"""Held-out preference pairs (the dpo/mpo layouts): which answer does each model prefer?

For every model (the base and each adapter) and every pair, the summed log-probability of the
chosen and of the rejected answer (their label tokens, as training sums them). Two numbers:

- **prefers chosen**: log p(chosen) > log p(rejected) — meaningful for the base too;
- **reward accuracy** (adapters): the DPO reward of the chosen answer beats the rejected one's,
  with the base as the reference: [log p(c) - log base(c)] > [log p(r) - log base(r)]. It equals the
  `eval_reward_accuracy` that training reports for a `reference: base` adapter on the same pairs.

Either counts a pair only when the difference exceeds what rounding alone can make of a tie
(train/objectives.py's `rounding_noise`, as training counts it).

No decoding: one no-grad forward per micro-batch of answers, every model's rows side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.preference import PreferencePair, load_preference_pairs
from lorafleet.fleet_dir import find_base_dir
from lorafleet.models.loading import FrozenBase, load_base
from lorafleet.train.objectives import rounding_noise, wins
from lorafleet.train.scoring import answer_logps


@dataclass
class PreferenceScores:
    pairs: int
    prefers_chosen: dict[str, float]  # model -> fraction of pairs
    reward_accuracy: dict[str, float]  # adapter -> fraction of pairs (reference: the base)
    reward_margin: dict[str, float]  # adapter -> mean chosen - rejected reward, beta = 1


def is_preference_file(path: Path) -> bool:
    """True when the first record of a JSONL file is a preference pair (has chosen and rejected)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "chosen" in first and "rejected" in first
    return False


def evaluate_preferences(options, progress: bool = True) -> PreferenceScores:
    """`lorafleet eval` on a file of pairs: the base and the fleet's adapters (`options`: EvalOptions),
    recorded in the fleet's registry and audit log when it has them."""
    from lorafleet.eval.run import _load_adapters, record_scores

    base = load_base(options.base_dir or find_base_dir(options.fleet_dir))
    fleet = LoRAFleet(base.model, base.language_prefix)
    models = {"base": None} | _load_adapters(fleet, options)
    scores = score_pairs(base, fleet, options.data, models)
    record_scores(
        options.fleet_dir,
        options.data,
        "preference",
        {
            name: {"prefers_chosen": scores.prefers_chosen[name], "pairs": scores.pairs}
            | ({"reward_accuracy": scores.reward_accuracy[name]} if name in scores.reward_accuracy else {})
            for name in models
        },
    )
    return scores


def score_pairs(
    base: FrozenBase, fleet: LoRAFleet, path: Path, models: dict[str, int | None], micro_batch: int = 8
) -> PreferenceScores:
    """`models`: name -> image tiles (None: the model's default); "base" is the base alone."""
    logps = {}
    for name, tiles in models.items():
        pairs, _ = load_preference_pairs(path, base, max_tiles=tiles)
        route = None if name == "base" else name
        logps[name] = torch.cat([pair_logps(base, fleet, route, chunk) for chunk in _chunks(pairs, micro_batch)])
    return tally(logps, base.dtype)


def tally(logps: dict[str, torch.Tensor], computed_in: torch.dtype) -> PreferenceScores:
    """The scores from each model's (pairs, 2) summed log-probabilities of the chosen and rejected
    answers ("base" among them), computed in `computed_in`: a pair counts only beyond rounding noise."""
    chosen_base, rejected_base = logps["base"].unbind(1)
    prefers, accuracy, margin = {}, {}, {}
    for name, values in logps.items():
        chosen, rejected = values.unbind(1)
        prefers[name] = wins(chosen - rejected, rounding_noise(computed_in, chosen, rejected)).mean().item()
        if name != "base":
            rewards = (chosen - chosen_base) - (rejected - rejected_base)
            noise = rounding_noise(computed_in, chosen, rejected, chosen_base, rejected_base)
            accuracy[name] = wins(rewards, noise).mean().item()
            margin[name] = rewards.mean().item()
    return PreferenceScores(len(chosen_base), prefers, accuracy, margin)


def pair_logps(base: FrozenBase, fleet: LoRAFleet, route: str | None, pairs: list[PreferencePair]) -> torch.Tensor:
    """(pairs, 2): summed log-probabilities of each pair's chosen and rejected answer under `route`."""
    return answer_logps(base, fleet, [(route, pairs)], length_multiple=8)[0].view(2, -1).T


def format_scores(scores: PreferenceScores) -> str:
    models = list(scores.prefers_chosen)
    width = max(12, *(len(m) for m in models))
    header = f"{'':<28} " + " ".join(f"{m:>{width}}" for m in models)
    lines = [header, "-" * len(header)]
    lines.append(f"{'prefers chosen':<28} " + " ".join(f"{scores.prefers_chosen[m]:>{width}.1%}" for m in models))

    def row(label: str, values: dict[str, float], spec: str) -> str:
        cells = (f"{values[m]:>{width}{spec}}" if m in values else f"{'-':>{width}}" for m in models)
        return f"{label:<28} " + " ".join(cells)

    lines.append(row("reward accuracy (vs base)", scores.reward_accuracy, ".1%"))
    lines.append(row("reward margin (beta = 1)", scores.reward_margin, ".3f"))
    lines.append(f"{scores.pairs} held-out pairs")
    return "\n".join(lines)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
