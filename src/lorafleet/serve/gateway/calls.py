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
    on_start: Callable[[], None] | None = None
    finished: bool = False
    known_model: bool = False  # the model exists and the caller may use it (a metric label then)
    max_tokens: int | None = None  # the reply's cap, as the backend settled it
    reservation: object = None  # the tenant's token reservation (`Tenant.reserve`)
    content: dict | None = None  # the request's messages, kept only with --log-content
    input_sha256: str | None = None  # of the request's messages (or prompt): the audit log's record
    replies: list[str] | None = None  # every choice's text, once generated (hashed for the audit log)
    fingerprint: str = "lorafleet"  # the replies' system_fingerprint: this server's build and base

    def starting(self) -> None:
        """Called by the backend once the request is valid, just before generation starts; may
        refuse it (APIError), e.g. when the tenant's token budget cannot hold it."""
        if self.on_start is not None:
            self.on_start()

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
