"""The gateway's per-tenant places (serve/gateway/admission.py): a tenant waits behind its own
requests only, in order of arrival, and one that hangs up while waiting leaves nothing behind.
(Through a real server: tests/serve/test_limits.py.)"""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.serve.gateway.admission import TenantLimiter
from lorafleet.serve.gateway.errors import APIError


def test_a_tenant_waits_behind_its_own_requests_in_order_and_another_goes_straight_in():
    async def scenario() -> list[str]:
        limiter, entered = TenantLimiter(2, waiting=2), []

        async def request(tenant: str, name: str, holds: float) -> None:
            async with limiter.hold(tenant):
                entered.append(name)
                await asyncio.sleep(holds)

        hostile = [asyncio.create_task(request("hostile", f"h{i}", 0.05)) for i in range(4)]
        await asyncio.sleep(0)  # two inside, two waiting
        with pytest.raises(APIError, match="2 requests in flight and 2 waiting for tenant hostile") as refused:
            await limiter.enter("hostile")
        assert refused.value.status == 429
        await request("victim", "v", 0)
        await asyncio.gather(*hostile)
        assert limiter._lanes == {}, "nothing kept for tenants with nothing in flight"
        return entered

    assert asyncio.run(scenario()) == ["h0", "h1", "v", "h2", "h3"]


def test_a_request_that_hangs_up_while_waiting_gives_its_turn_to_the_next():
    async def scenario() -> None:
        limiter = TenantLimiter(1, waiting=1)
        leave = await limiter.enter("t")
        gone = asyncio.create_task(limiter.enter("t"))
        await asyncio.sleep(0)
        gone.cancel()  # its client hung up
        await asyncio.sleep(0)
        assert limiter._lanes["t"].waiting == 0
        after = asyncio.create_task(limiter.enter("t"))  # not refused: the place in the queue is free again
        await asyncio.sleep(0)
        leave()
        (await after)()
        assert limiter._lanes == {}

    asyncio.run(scenario())
