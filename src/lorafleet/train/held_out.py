"""Held-out evaluation during training: each adapter's `eval_data`, scored as training scores it.

An SFT adapter's measure is its loss averaged over every held-out answer token; a preference
adapter's is its objective, reward margin and reward accuracy averaged over every held-out pair.
Adapters due at the same step are evaluated side by side in each batch, as they train. Gradients
are off, so the layers take their inference path (no dropout) and nothing draws on the RNG: a
resumed run stays exact. The numbers join the step's line in metrics.jsonl (eval_loss, ...).
"""

from __future__ import annotations

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.config import FleetSpec
from lorafleet.data.batch import stack_micro_batches
from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.models.attention import training_attention
from lorafleet.models.loading import FrozenBase
from lorafleet.train.distributed import Group
from lorafleet.train.job import AdapterJob
from lorafleet.train.objectives import SFT, AnswerLogProbs
from lorafleet.train.references import ReferenceCache
from lorafleet.train.scoring import ScoredBatch, answer_logps, label_count, sequence_losses


class HeldOut:
    def __init__(
        self,
        base: FrozenBase,
        fleet: LoRAFleet,
        spec: FleetSpec,
        examples: dict[str, list],
        references: ReferenceCache,
        evaluates: bool = True,
        together: Group | None = None,
    ) -> None:
        """`examples`: each adapter's held-out records. `evaluates`: whether this process evaluates
        (data-parallel processes hold the same weights: process 0 alone evaluates, unless the base
        is sharded and needs every process in each forward); `together`: the processes that then
        evaluate every pair together."""
        self.base, self.fleet, self.spec = base, fleet, spec
        self.examples, self.references = examples, references
        self.evaluates, self.together = evaluates, together

    def due(self, job: AdapterJob) -> bool:
        """After the job's last optimizer step, and every `eval_every` steps."""
        if not self.evaluates or job.name not in self.examples:
            return False
        every = job.spec.eval_every
        return job.done or (every is not None and job.optimizer_step % every == 0)

    def measure(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """The held-out numbers of each of `jobs`, by adapter name."""
        answers = [job for job in jobs if isinstance(job.objective, SFT)]
        pairs = [job for job in jobs if not isinstance(job.objective, SFT)]
        return self._answer_losses(answers) | self._pair_measures(pairs)

    def _answer_losses(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """Held-out loss: every eval record once, the adapters side by side in each batch as in
        training, averaged over answer tokens as the training loss is."""
        if not jobs:
            return {}
        groups = {job.name: _chunks(self.examples[job.name], job.spec.micro_batch_size) for job in jobs}
        sums: dict[str, list[torch.Tensor]] = {job.name: [] for job in jobs}
        counts = dict.fromkeys(sums, 0)
        pad_id, multiple = self.base.tokenizer.pad_token_id, self.spec.length_multiple
        with torch.no_grad(), training_attention():
            for index in range(max(len(batches) for batches in groups.values())):
                micro_batches = [(name, batches[index]) for name, batches in groups.items() if index < len(batches)]
                batch, routing = stack_micro_batches(micro_batches, pad_id, multiple)
                adapter_segments = [segment for segment in routing if segment.adapter is not None]
                chunked = self.spec.chunked_loss
                scored = ScoredBatch.lay_out(batch, routing, adapter_segments, self.base.device, chunked)
                with self.fleet.route(routing):
                    losses = sequence_losses(self.base, scored, chunked=chunked)
                for segment, loss in zip(adapter_segments, losses, strict=True):
                    # the loss is a mean over the segment's label tokens (labels shifted by one), counted on the host
                    count = int((batch.labels[segment.start : segment.end, 1:] != IGNORE_INDEX).sum())
                    sums[segment.adapter].append(loss * count)
                    counts[segment.adapter] += count
        totals = torch.stack([torch.stack(parts).sum() for parts in sums.values()]).tolist()  # one sync
        return {name: {"eval_loss": total / max(counts[name], 1)} for name, total in zip(sums, totals, strict=True)}

    def _pair_measures(self, jobs: list[AdapterJob]) -> dict[str, dict[str, float]]:
        """Each preference objective's held-out measure over every held-out pair, a micro-batch at a
        time, weighted by pairs."""
        if not jobs:
            return {}
        chunks = {job.name: _chunks(self.examples[job.name], job.spec.micro_batch_size) for job in jobs}
        sums: dict[str, list[torch.Tensor]] = {job.name: [] for job in jobs}
        for index in range(max(len(c) for c in chunks.values())):
            batch_jobs = [(job, chunks[job.name][index]) for job in jobs if index < len(chunks[job.name])]
            references = self.references.of(batch_jobs, self.together)
            policies = answer_logps(
                self.base,
                self.fleet,
                [(job.name, pairs) for job, pairs in batch_jobs],
                self.spec.length_multiple,
                self.spec.chunked_loss,
            )
            for (job, pairs), policy, reference in zip(batch_jobs, policies, references, strict=True):
                tokens = torch.tensor([label_count(e) for e in job.objective.rows(pairs)], device=policy.device)
                logps = AnswerLogProbs(policy, reference, tokens, self.base.dtype)
                sums[job.name].append(job.objective.held_out_sums(logps, len(pairs)))
        totals = torch.stack([torch.stack(parts).sum(0) for parts in sums.values()]).tolist()  # one sync
        results = {}
        for job, values in zip(jobs, totals, strict=True):
            means = [value / len(self.examples[job.name]) for value in values]
            results[job.name] = dict(zip(job.objective.held_out_names, means, strict=True))
        return results


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
