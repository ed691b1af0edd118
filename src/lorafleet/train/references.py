"""The reference log-probabilities of preference pairs, computed once per pair and kept.

DPO and MPO compare the policy's summed log-probability of each answer with the reference's. The
reference (the base alone, or the adapter's frozen `init_from` weights) never changes, so each
pair's two numbers are computed the first time the pair is met, in one no-grad pass over every
new pair of the step, and kept for every later epoch. They travel with checkpoints, so a resumed
run uses the very numbers the killed one computed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.config import FleetSpec
from lorafleet.data.preference import PreferencePair
from lorafleet.models.loading import FrozenBase
from lorafleet.train.distributed import Group
from lorafleet.train.job import AdapterJob
from lorafleet.train.objectives import MicroBatch
from lorafleet.train.scoring import answer_logps


class ReferenceCache:
    def __init__(self, base: FrozenBase, fleet: LoRAFleet, spec: FleetSpec, dtype: torch.dtype) -> None:
        """`spec`: the fleet's batch layout (length multiple, chunked loss); `dtype`: the values'
        (the LoRA masters')."""
        self.base, self.fleet, self.dtype = base, fleet, dtype
        self.length_multiple, self.chunked = spec.length_multiple, spec.chunked_loss
        self.logps: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> pair source -> (chosen, rejected)

    def look_up(self, jobs: list[AdapterJob], parts: list[MicroBatch], together: Group | None = None) -> None:
        """Give each part whose objective needs a reference its pairs' reference log-probabilities.
        Every process of `together` caches its whole micro-batch first (`cache`), so every process
        holds every pair's."""
        needing = [(job, part) for job, part in zip(jobs, parts, strict=True) if job.objective.needs_reference]
        if together is not None:
            self.cache([(job, part.drawn) for job, part in needing], together)
        found = self.of([(job, part.items) for job, part in needing])
        for (_, part), references in zip(needing, found, strict=True):
            part.references = references

    def of(
        self, items: list[tuple[AdapterJob, list[PreferencePair]]], together: Group | None = None
    ) -> list[torch.Tensor]:
        """Reference log-probabilities of the answers of each item's pairs, [chosen..., rejected...],
        from the cache, into which pairs met for the first time go first (`cache`)."""
        self.cache(items, together)
        references = []
        for job, pairs in items:
            known = self.logps[job.name]
            references.append(torch.stack([known[pair.source] for pair in pairs], 1).reshape(-1))
        return references

    def cache(self, items: list[tuple[AdapterJob, list[PreferencePair]]], together: Group | None) -> None:
        """Compute and keep the reference log-probabilities (chosen, rejected) of the pairs of `items`
        not met before, in one no-grad pass routed to no adapter (reference: base) or to the adapter's
        frozen initial weights (reference: init).

        `together` (data-parallel; `items` the same on every process): every process keeps every
        pair's references. The processes then agree without a word on which pairs are new, split
        them r::world, each computes its part, and one all-reduce hands all of them to everyone:
        each pair is computed once, and every process runs the same reference forwards, which a
        sharded base needs (each forward gathers every layer from all processes; one process
        skipping a forward another runs would leave that one waiting until the timeout). Keeping
        only one's own pairs instead would make "new" differ between processes from the second
        shuffled epoch on, and agreeing on it each step would cost every step a synchronisation."""
        new = {(job.name, pair.source): (job, pair) for job, pairs in items for pair in pairs}
        new = [item for key, item in new.items() if key[1] not in self.logps.setdefault(key[0], {})]
        if not new:
            return
        rank, world = (together.rank, together.world) if together is not None else (0, 1)
        mine = new[rank::world]
        # a process with no new pair of its own still runs the forward (on one it drops): see above
        values = self._values(mine or new[:1])[: len(mine)]
        if together is not None:
            everyone = values.new_zeros(len(new), 2)
            everyone[rank::world] = values
            values = together.all_reduce(everyone)  # each row is one process's values plus zeros: exact
        for (job, pair), pair_values in zip(new, values, strict=True):
            self.logps[job.name][pair.source] = pair_values

    def _values(self, new: list[tuple[AdapterJob, PreferencePair]]) -> torch.Tensor:
        """(pairs, 2): the reference log-probabilities of the chosen and rejected answer of each of
        `new`, in one pass over every job's pairs."""
        by_job: dict[str, tuple[AdapterJob, list[int]]] = {}
        for position, (job, _) in enumerate(new):
            by_job.setdefault(job.name, (job, []))[1].append(position)
        groups = [(job.objective.reference_route, [new[i][1] for i in positions]) for job, positions in by_job.values()]
        values = torch.empty(len(new), 2, dtype=self.dtype, device=self.base.device)
        logps = answer_logps(self.base, self.fleet, groups, self.length_multiple, self.chunked)
        for (_, positions), answers in zip(by_job.values(), logps, strict=True):
            values[positions] = torch.stack(answers.chunk(2), 1).to(values.dtype)
        return values

    def forget(self, name: str) -> None:
        """A finished adapter's pairs are never met again."""
        self.logps.pop(name, None)

    def saved(self, names: Iterable[str] | None = None) -> dict[str, dict[str, list[float]]]:
        """What a checkpoint keeps (of the adapters `names`, or of all)."""
        return {
            name: {source: values.tolist() for source, values in known.items()}
            for name, known in self.logps.items()
            if names is None or name in names
        }

    def restore(self, saved: dict[str, dict[str, list[float]]]) -> None:
        device, dtype = self.base.device, self.dtype
        for name, known in saved.items():
            self.logps[name] = {source: torch.tensor(v, dtype=dtype, device=device) for source, v in known.items()}
