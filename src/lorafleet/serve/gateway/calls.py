"""One chat completion as the gateway sees it: who asked, for what, and how it ended.

Backends fill in the token counts and call `finish` exactly once, when the reply (or the stream)
is over; the gateway then records the call in metrics, the tenant's token budget and the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.serve.gateway.tenants import Tenant


@dataclass
class Call:
    request_id: str
    model: str  # the name the client asked for
    tenant: Tenant | None = None
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_seconds: float | None = None  # streaming only
    on_finish: Callable[[Call, int, str | None], None] | None = None
    finished: bool = False

    def finish(self, status: int, error: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_finish is not None:
            self.on_finish(self, status, error)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
