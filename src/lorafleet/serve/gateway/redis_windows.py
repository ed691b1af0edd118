"""The Redis half of the shared serving state: each tenant's requests and tokens in the last
minute, checked and changed in one Lua script each, so that a check and its reservation are one
atomic step however many replicas ask at once (Redis runs one script at a time).

The windows mean what the embedded ones (tenants.py) mean, entry for entry: a request is counted
when the tenant's request window has room and its token window is not spent; tokens are reserved
when they fit under the limit and settled to what the request used while the reservation is in
the window. Times are Redis's own clock (TIME), one clock for every replica. A tenant's keys share
one hash tag, `{lorafleet:TENANT}`, so that they live in one slot of a Redis Cluster too, and
expire a window after their last use.

    {lorafleet:T}:requests   sorted set: request number -> time (ms)
    {lorafleet:T}:tokens     sorted set: reservation number -> time (ms)
    {lorafleet:T}:held       hash: reservation number -> tokens; "total" -> their sum
    {lorafleet:T}:seq        the tenant's counter of requests and reservations
"""

from __future__ import annotations

import redis

from lorafleet.serve.gateway.state import StateUnavailable, without_password
from lorafleet.serve.gateway.tenants import WINDOW_SECONDS

TIMEOUT_S = 0.5  # connect and per-command: a Redis that answers slower than this counts as unreachable

# Shared by the scripts: `now` in ms from Redis's clock; tokens reserved more than a window ago
# leave the window and its total.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local function expire_tokens(tokens, held)
  local gone = redis.call('ZRANGEBYSCORE', tokens, '-inf', now - window)
  for _, id in ipairs(gone) do
    redis.call('HINCRBY', held, 'total', -tonumber(redis.call('HGET', held, id) or '0'))
    redis.call('HDEL', held, id)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', tokens, '-inf', now - window) end
end
local function oldest(set)
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if #first == 0 then return now end
  return tonumber(first[2])
end
local function keep(key) redis.call('PEXPIRE', key, window + 1000) end
"""

# KEYS: requests, tokens, held, seq. ARGV: window ms, requests per minute, tokens per minute (0: none).
# Returns 0 when the request is counted, else the ms until one is allowed.
COUNT_REQUEST = (
    _PRELUDE
    + """
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local wait = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then wait = math.max(wait, oldest(KEYS[1]) + window - now) end
end
if tpm > 0 then
  expire_tokens(KEYS[2], KEYS[3])
  if tonumber(redis.call('HGET', KEYS[3], 'total') or '0') >= tpm then
    wait = math.max(wait, oldest(KEYS[2]) + window - now)
  end
end
if wait > 0 then return wait end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, redis.call('INCR', KEYS[4]))
  keep(KEYS[1])
end
return 0
"""
)

# KEYS: tokens, held, seq. ARGV: window ms, tokens, tokens per minute.
# Returns {reservation number, 0}, or {0, ms until the oldest reservation leaves the window}.
RESERVE_TOKENS = (
    _PRELUDE
    + """
local want, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
expire_tokens(KEYS[1], KEYS[2])
if tonumber(redis.call('HGET', KEYS[2], 'total') or '0') + want > tpm then
  return {0, math.max(oldest(KEYS[1]) + window - now, 0)}
end
local id = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, want)
redis.call('HINCRBY', KEYS[2], 'total', want)
keep(KEYS[1])
keep(KEYS[2])
return {id, 0}
"""
)

# KEYS: held. ARGV: window ms, reservation number, tokens used. A reservation that has left the
# window is no longer counted, so settling it changes nothing.
SETTLE_TOKENS = (
    _PRELUDE
    + """
local held = redis.call('HGET', KEYS[1], ARGV[2])
if held then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[3]) - tonumber(held))
end
return 0
"""
)


class RedisWindows:
    def __init__(self, url: str, window_seconds: float = WINDOW_SECONDS) -> None:
        self.url = url
        self.window_ms = int(window_seconds * 1000)
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._count = self.client.register_script(COUNT_REQUEST)
        self._reserve = self.client.register_script(RESERVE_TOKENS)
        self._settle = self.client.register_script(SETTLE_TOKENS)

    def count_request(
        self, tenant: str, requests_per_minute: int | None, tokens_per_minute: int | None
    ) -> float | None:
        keys = _keys(tenant)
        args = [self.window_ms, requests_per_minute or 0, tokens_per_minute or 0]
        wait_ms = self._run(self._count, [keys["requests"], keys["tokens"], keys["held"], keys["seq"]], args)
        return wait_ms / 1000 if wait_ms else None

    def reserve(self, tenant: str, tokens: int, tokens_per_minute: int) -> tuple[int | None, float]:
        keys = _keys(tenant)
        args = [self.window_ms, tokens, tokens_per_minute]
        reservation, wait_ms = self._run(self._reserve, [keys["tokens"], keys["held"], keys["seq"]], args)
        return (reservation, 0.0) if reservation else (None, wait_ms / 1000)

    def settle(self, tenant: str, reservation: int, tokens: int) -> None:
        self._run(self._settle, [_keys(tenant)["held"]], [self.window_ms, reservation, tokens])

    def close(self) -> None:
        self.client.close()

    def _run(self, command, *args):
        try:
            return command(*args)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StateUnavailable(f"Redis at {without_password(self.url)}: {err}") from err


def _keys(tenant: str) -> dict[str, str]:
    tag = "{lorafleet:" + tenant + "}"
    return {part: f"{tag}:{part}" for part in ("requests", "tokens", "held", "seq")}
