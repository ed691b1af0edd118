"""A completion request as the gateway tracks it, in two parts.

`PreparedRequest`: what a backend made of the request before anything generates (its prompts
rendered and counted, its choices and their reply cap settled, everything checked). The gateway
admits it against the tenant's limits from these numbers, then has the backend submit it.

`Call`: the gateway's record of the request from its first byte to its last: who asked, for what,
what it used and how it ended. The gateway and the reply's formatter fill it in; once it has
ended, accounting records it (usage, metrics, request log, audit log).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lorafleet.serve.gateway.tenants import Tenant


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to submit; each backend adds what it submits (`LocalRequest`, `UpstreamRequest`)."""

    # Each prompt's tokens, in order; 0 where the backend cannot count them (an upstream counts its own).
    prompt_tokens: tuple[int, ...]
    choices: int  # `n`: replies to each prompt
    reply_tokens: int  # each reply's cap

    @property
    def most_tokens(self) -> int:
        """The most the request can use: every prompt once, and every choice of every prompt at its cap."""
        return sum(self.prompt_tokens) + self.reply_tokens * self.choices * len(self.prompt_tokens)


@dataclass
class Call:
    request_id: str
    model: str  # the name the client asked for
    tenant: Tenant | None = None
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0  # every prompt's, once each (as OpenAI counts them, however many choices)
    completion_tokens: int = 0  # every choice's
    first_token_seconds: float | None = None  # streaming only
    status: int | None = None  # how it ended (HTTP status; 499: the client hung up); None while it runs
    error: str | None = None
    known_model: bool = False  # the model exists and the caller may use it (a metric label then)
    reservation: object | None = None  # the tenant's token reservation (`ServingState.reserve_tokens`)
    content: dict | None = None  # the request's messages, kept only with --log-content
    input_sha256: str | None = None  # of the request's messages (or prompt): the audit log's record
    replies: list[str] | None = None  # every choice's text, once generated (hashed for the audit log)
    fingerprint: str = "lorafleet"  # the replies' system_fingerprint: this server's build and base

    def finish(self, status: int, error: str | None = None) -> None:
        """The call has ended; the first ending counts (a stream that fails, then loses its client,
        ended with the failure)."""
        if self.status is None:
            self.status, self.error = status, error

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
