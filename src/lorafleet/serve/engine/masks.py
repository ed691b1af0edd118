"""Grammar rows' token masks, computed beside the engine thread, never on it, within a budget.

A mask is the one per-token cost a tenant's grammar adds: llguidance walks the tokenizer's trie
under the row's parser, from microseconds for a small schema to seconds for one with ten thousand
optional properties. Computed on the engine thread, holding the model lock, it stalled every
other tenant's rows for that long. So, as vLLM computes its grammars' bitmasks in the scheduler
while the device runs the previous step and SGLang fills them while its forward runs: a row's
next mask is started on a small thread pool as soon as its last token is accepted (`start`; the
matcher drops the GIL), and collected when the step samples (`gather`): on the eager path after
the step's forward, so the masks compute during it; before a captured graph's replay otherwise.
A prefill starts its rows' first masks before its forward in the same way.

The step waits for masks at most `budget_s`. A row whose mask is later than that, or whose grammar
stopped on one of llguidance's limits, fails alone, as the request's own fault (a 4xx at the
gateway): the other rows take their tokens as if it had never been there. A mask still running
when its row fails finishes on its thread and is dropped; llguidance's per-step limits bound how
long that takes.

No llguidance import here: the engine runs without it (a grammar row brings its own matcher).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorafleet.serve.engine.grammar import RowGrammar
    from lorafleet.serve.engine.streams import Row


class MaskWorkers:
    """Computes grammar rows' masks on `threads` threads; a step waits at most `budget_s` for them."""

    def __init__(self, vocab_size: int, threads: int, budget_s: float) -> None:
        self.words = (vocab_size + 31) // 32
        self.budget_s = budget_s
        # Threads start on the first submit: a server that never sees a grammar never has them.
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="lorafleet-masks")

    def start(self, rows: list[Row]) -> None:
        """Start the next mask of every row that is under a grammar and still running."""
        for row in rows:
            if row.grammar is not None and row.finish is None and row.mask is None:
                row.mask = self._pool.submit(_next_mask, row.grammar, self.words)

    def gather(self, rows: list[Row]) -> tuple[torch.Tensor | None, dict[Row, tuple[str, bool]]]:
        """The host bitmask of `rows` (rows, words) int32, all bits set for a row without a grammar
        (None when no row has one), and the rows that cannot go on: (why, whether it is the
        request's own fault). Their masks were not ready within the budget, or their grammars
        stopped on a limit (the request's fault), or computing one raised (the server's)."""
        pending = [row.mask for row in rows if row.grammar is not None and row.mask is not None]
        if not pending and all(row.grammar is None for row in rows):
            return None, {}
        wait(pending, timeout=self.budget_s)
        bitmask = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        failed = {}
        for index, row in enumerate(rows):
            if row.grammar is None:
                continue
            job, row.mask = row.mask, None
            reason = self._outcome(job, bitmask[index])
            if reason is not None:
                failed[row] = reason
        return bitmask, failed

    def _outcome(self, job: Future | None, target: torch.Tensor) -> tuple[str, bool] | None:
        """Copy a finished job's mask into `target`; else why the row cannot go on, and whose fault."""
        if job is None or not job.done():
            late = (
                f"the reply's grammar did not produce its next allowed tokens within the server's budget of "
                f"{self.budget_s * 1000:g} ms; simplify the schema"
            )
            return late, True
        if job.exception() is not None:
            return f"{type(job.exception()).__name__}: {job.exception()}", False
        mask, refused = job.result()
        if refused is not None:
            return refused, True
        target.copy_(mask)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _next_mask(grammar: RowGrammar, words: int) -> tuple[torch.Tensor, str | None]:
    """The row's next mask, and why its grammar cannot go on (a limit stopped it), if it cannot."""
    mask = torch.empty(words, dtype=torch.int32)
    return mask, grammar.fill(mask)
