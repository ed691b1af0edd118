"""What a request costs the gateway with each serving state: the embedded one (keys file, windows
in the process, SQLite) against the shared one of replicas (PostgreSQL and Redis).

    python benchmarks/gateway_overhead.py                                   # 2,000 requests, 200 at once
    python benchmarks/gateway_overhead.py --requests 40 --concurrency 8 --json r.json   # smallest (the suite's)
    python benchmarks/gateway_overhead.py --state postgresql://… --redis redis://…     # servers of your own

A real `lorafleet serve` on 127.0.0.1 serves the tiny model, one token per reply, so that what is
timed is the gateway's own path (key, limits, prepare, one engine step, usage, request log,
audit entry) more than generation. The tenant has request and token limits, so every request
checks and reserves its windows (in Redis, for the shared state) and is logged (in PostgreSQL,
where the replica also waits for its audit entry before replying). Each state gets the same
requests from `--concurrency` clients at once; p50 and p99 are per request, end to end as the
client sees them; a connection dropped under load is counted (`dropped_connections`), not timed.
`shared_minus_embedded_p50_ms` is what the shared state adds to a request's latency (at
--concurrency 1 its own cost; at 200 mostly queueing), `shared_minus_embedded_ms_per_request`
what it adds to the server's time per request (1 / throughput), which queueing does not blur.

Without --state and --redis, throwaway PostgreSQL and Redis servers are started in a temporary
directory (PostgreSQL as `nobody` when run as root) and removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from lorafleet.models.tiny import build_tiny_qwen2
from lorafleet.serve.gateway.tenants import hash_key

KEY = "sk-bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {seconds} s")
        time.sleep(0.1)


@contextmanager
def throwaway_services(root: Path):
    """A PostgreSQL and a Redis of their own, for this run only: (database URL, Redis URL)."""
    bindir = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), default=None)
    if bindir is None or shutil.which("redis-server") is None:
        raise SystemExit("needs PostgreSQL and redis-server installed, or --state and --redis of your own")
    pg_root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-pg-"))
    as_user = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(pg_root, "nobody")
        as_user = {"user": "nobody", "group": "nogroup", "extra_groups": []}
    pg_port, redis_port = free_port(), free_port()
    initdb = [str(bindir / "initdb"), "-D", str(pg_root / "data"), "-U", "lorafleet", "-A", "trust", "--no-sync"]
    subprocess.run(initdb, check=True, capture_output=True, **as_user)
    postgres = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(pg_root / "data"), "-p", str(pg_port), "-k", str(pg_root)]
        + ["-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **as_user,
    )
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: accepts(pg_port) and accepts(redis_port), "PostgreSQL and Redis", 60)
        time.sleep(1)  # PostgreSQL listens a moment before it accepts logins
        yield f"postgresql://lorafleet@127.0.0.1:{pg_port}/postgres", f"redis://127.0.0.1:{redis_port}/0"
    finally:
        postgres.send_signal(signal.SIGINT)
        redis.terminate()
        postgres.wait(timeout=60)
        redis.wait(timeout=60)
        shutil.rmtree(pg_root, ignore_errors=True)


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def gateway(root: Path, name: str, state: list[str]):
    """A `lorafleet serve` of the tiny model with one limited tenant: its URL."""
    fleet = root / name
    build_tiny_qwen2(fleet / "base")
    keys = root / f"{name}-keys.yaml"
    tenant = {"name": "bench", "key_sha256": hash_key(KEY), "adapters": "*"}
    keys.write_text(yaml.safe_dump({"tenants": [tenant | {"requests_per_minute": 10**6, "tokens_per_minute": 10**9}]}))
    port = free_port()
    command = [sys.executable, "-m", "lorafleet.cli", "serve", "--fleet", str(fleet), "--keys", str(keys)]
    log = (root / f"{name}.log").open("wb")
    server = subprocess.Popen([*command, "--port", str(port), "--max-batch", "64", *state], stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: running(server, name) and accepts(port), f"lorafleet serve ({name})")
        yield url
    except BaseException:
        print(f"lorafleet serve ({name}) said:\n{(root / f'{name}.log').read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()


def running(server: subprocess.Popen, name: str) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"lorafleet serve ({name}) exited with {server.returncode}")
    return True


async def load(url: str, requests: int, concurrency: int) -> dict:
    """`requests` chat completions, `concurrency` at a time: latency percentiles and requests/s."""
    body = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    dropped: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(min(concurrency, 8)):  # warm up: first shapes, connections
            (await client.post("/v1/chat/completions", json=body, headers=headers)).raise_for_status()

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                try:
                    reply = await client.post("/v1/chat/completions", json=body, headers=headers)
                except httpx.TransportError:  # counted, not timed: a dropped connection is not a latency
                    dropped.append(1)
                    continue
                reply.raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "requests_per_s": len(ordered) / seconds,
        "dropped_connections": len(dropped),
    }


def measure(root: Path, name: str, state: list[str], requests: int, concurrency: int) -> dict:
    with gateway(root, name, state) as url:
        return asyncio.run(load(url, requests, concurrency))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--state", help="a PostgreSQL database of your own (else a throwaway one)")
    parser.add_argument("--redis", help="a Redis of your own (else a throwaway one)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    try:
        embedded = measure(root, "embedded", [], args.requests, args.concurrency)
        if args.state and args.redis:
            shared = measure(
                root, "shared", ["--state", args.state, "--redis", args.redis], args.requests, args.concurrency
            )
        else:
            with throwaway_services(root) as (database, redis):
                shared = measure(
                    root, "shared", ["--state", database, "--redis", redis], args.requests, args.concurrency
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "embedded": embedded,
        "shared": shared,
        "shared_minus_embedded_p50_ms": shared["p50_ms"] - embedded["p50_ms"],
        # The server's time per request at this load, whatever the queueing: what the state costs it.
        "shared_minus_embedded_ms_per_request": 1000 / shared["requests_per_s"] - 1000 / embedded["requests_per_s"],
    }
    for name in ("embedded", "shared"):
        row = result[name]
        print(
            f"{name:<9} p50 {row['p50_ms']:8.1f} ms   p99 {row['p99_ms']:8.1f} ms   {row['requests_per_s']:7.1f} req/s"
            f"   {row['dropped_connections']} connections dropped"
        )
    print(
        f"the shared state adds {result['shared_minus_embedded_p50_ms']:.1f} ms at p50 and "
        f"{result['shared_minus_embedded_ms_per_request']:.1f} ms of the server's time per request"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
