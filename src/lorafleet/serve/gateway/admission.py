"""How many of each tenant's requests the gateway takes on at once, so that one tenant's many
(or slow) requests never hold another's back.

A `TenantLimiter` gives each tenant its own places in a stage: at most `limit` of a tenant's
requests inside at once, more of them waiting their turn in order of arrival, up to `waiting`;
past that the tenant gets a 429. Tenants never wait for one another: a hostile tenant's requests
queue behind its own. The gateway keeps two: requests in flight (from reading the body to the
reply's last byte) and requests being prepared (on the backend's bounded pool of threads, which
fetches images and tokenises: one tenant may hold at most half of it, so that six slow image
hosts can no longer hold every tenant's preparation, as they did the default thread pool's).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from lorafleet.serve.gateway.errors import APIError


@dataclass
class _Lane:
    """One tenant's places in a stage (asyncio.Semaphore hands a freed place to its first waiter)."""

    places: asyncio.Semaphore
    inside: int = 0
    waiting: int = 0

    @property
    def idle(self) -> bool:
        return self.inside == 0 and self.waiting == 0


class TenantLimiter:
    """At most `limit` of one tenant's requests in a stage at once, up to `waiting` more waiting
    (None: any number); every tenant has its own places."""

    def __init__(self, limit: int, waiting: int | None = None, stage: str = "requests in flight") -> None:
        self.limit, self.waiting, self.stage = limit, waiting, stage
        self._lanes: dict[str | None, _Lane] = {}

    async def enter(self, tenant: str | None) -> Callable[[], None]:
        """Wait for one of the tenant's places (429 when too many of its requests wait already);
        returns what gives the place back (calling it again does nothing)."""
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = _Lane(asyncio.Semaphore(self.limit))
        if lane.inside >= self.limit and self.waiting is not None and lane.waiting >= self.waiting:
            raise APIError(
                429,
                f"Too many requests at once: {lane.inside} {self.stage} and {lane.waiting} waiting for "
                f"tenant {tenant}; wait for some to finish",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        lane.waiting += 1
        try:
            await lane.places.acquire()
        except BaseException:  # the caller gave up waiting (it hung up): it leaves nothing behind
            lane.waiting -= 1
            self._forget_if_idle(tenant, lane)
            raise
        lane.waiting -= 1
        lane.inside += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                lane.inside -= 1
                lane.places.release()
                self._forget_if_idle(tenant, lane)

        return give_back

    def _forget_if_idle(self, tenant: str | None, lane: _Lane) -> None:
        if lane.idle and self._lanes.get(tenant) is lane:
            del self._lanes[tenant]  # nothing kept for tenants that are gone

    @asynccontextmanager
    async def hold(self, tenant: str | None) -> AsyncIterator[None]:
        give_back = await self.enter(tenant)
        try:
            yield
        finally:
            give_back()
