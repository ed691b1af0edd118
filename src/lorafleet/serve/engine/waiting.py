"""The requests waiting for a row of the batch: one queue per tenant, admitted in turn.

With one queue for everybody, a tenant that sent 16,000 sequences held every other tenant's
request behind them for minutes. Here each tenant queues on its own and admission goes round the
tenants, a request from each in turn (round-robin), so a request waits behind at most one request
of every other tenant for each of its own ahead of it. A tenant may also be held to `max_rows`
rows of the running batch: rows are never taken back once started, so without a cap one tenant's
long replies could hold every row until they end. The tenant is whatever tag the caller submits
(the gateway's tenant name, or None); the engine knows nothing else about it.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterator

from lorafleet.serve.engine.streams import Request


class WaitingRequests:
    """Not thread-safe: the engine holds its waiting lock around every call but `len`."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[Request]] = {}  # in turn order: the next tenant first
        self._count = 0  # kept, not summed: the engine loop reads it without the lock

    def add(self, request: Request) -> None:
        self._queues.setdefault(request.tenant, deque()).append(request)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Request]:
        return itertools.chain.from_iterable(self._queues.values())

    def drain(self) -> list[Request]:
        """Every waiting request, leaving none."""
        everything = list(self)
        self._queues.clear()
        self._count = 0
        return everything

    def take(self, slots: int, prompt_tokens: int, running: Counter, max_rows: int | None) -> list[Request]:
        """Up to `slots` requests, taking tenants in turn, with at most `prompt_tokens` of prompt
        among them (the first whatever its size), and none of a tenant that holds its cap of rows
        (`running`: rows per tenant now; the cap: its request's own `max_rows`, else `max_rows`).
        A tenant served goes to the back of the turn; one held by its cap keeps its place."""
        taken: list[Request] = []
        held = Counter(running)

        def has_room(tenant: str | None) -> bool:
            cap = self._queues[tenant][0].max_rows or max_rows
            return cap is None or held[tenant] < cap

        while len(taken) < slots:
            tenant = next((t for t in self._queues if has_room(t)), _NOBODY)
            if tenant is _NOBODY:
                break
            queue = self._queues.pop(tenant)
            cost = queue[0].prompt.num_tokens
            if taken and cost > prompt_tokens:
                self._queues = {tenant: queue, **self._queues}  # still first in turn
                break
            taken.append(queue.popleft())
            prompt_tokens -= cost
            held[tenant] += 1
            if queue:
                self._queues[tenant] = queue
        self._count -= len(taken)
        return taken


_NOBODY = object()  # no tenant may take a row (None is a tenant: requests without a tag)
