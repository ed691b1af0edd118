"""Compiling tenants' grammars where they can be killed: a small pool of worker processes, each
compile held to a time and a memory limit, and what they compiled cached per tenant.

llguidance compiles a grammar in one Rust call that nothing can interrupt. On a thread of the
server that was a denial of service: a schema of 2,000 `allOf` regexes grew the server by
gigabytes and never finished, and six schemas of 1,000 `patternProperties` held every thread of
the shared pool for minutes. So a tenant's constraint is first compiled by a worker process
(`grammar_worker.py`: a fresh interpreter, spawned, never forked from the server that holds torch),
whose address space is capped and which is killed when the compile outlasts its time; either
ends the request with a 400 that names the limit, and a fresh worker takes its place.

What crosses the process boundary is text: a compiled llguidance matcher cannot be pickled, but
llguidance's own grammar format can be rebuilt from. The worker compiles all that the server will
(the matcher and its first mask, under llguidance's limits), so a grammar it returns is known to
compile within the limits; the server then builds its own matcher from that text, on the pool's
thread (llguidance drops the GIL), once per tenant and constraint: the result is cached (an LRU
per tenant, refusals included), and each row of a request copies it.

At most one compile per tenant runs or waits at a time, so one tenant holds at most one worker:
the others' compiles are never queued behind more than one of its compiles per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorafleet.serve.engine.grammar import CompiledGrammar, GrammarError, Grammars

STARTUP_TIMEOUT_S = 120.0  # a worker reads a 150k-token vocabulary in about a second
_SOURCE_ROOT = str(Path(__file__).resolve().parents[3])  # where `lorafleet` is importable from


class GrammarSandbox:
    """Compiles constraints for `grammars`' tokenizer, under `grammars.limits`, in worker processes."""

    def __init__(self, grammars: Grammars) -> None:
        self.grammars = grammars
        self.limits = grammars.limits
        self._executor = ThreadPoolExecutor(
            self.limits.compile_workers, thread_name_prefix="lorafleet-grammar", initializer=_yield_to_the_engine
        )
        self._local = threading.local()  # each of the executor's threads drives a worker of its own
        self._workers: list[_Worker] = []
        self._workers_lock = threading.Lock()
        self._setup: bytes | None = None
        self._cache: dict[str, OrderedDict[str, CompiledGrammar | str]] = {}
        self._tenant_locks: dict[str, asyncio.Lock] = {}

    async def compile(self, tenant: str, kind: str, spec: dict, what: str) -> CompiledGrammar:
        """The constraint (`grammar.grammar_text`'s kind and spec) compiled for `tenant`; `what`
        names it in a refusal ("response_format schema"). GrammarError when it cannot be used or
        passes a limit."""
        key = hashlib.sha256(json.dumps([kind, spec], sort_keys=True).encode()).hexdigest()
        async with self._tenant_locks.setdefault(tenant, asyncio.Lock()):
            outcome = self._cached(tenant, key)
            if outcome is None:
                compiling = asyncio.get_running_loop().run_in_executor(self._executor, self._compile, kind, spec, what)
                outcome = await _to_the_end(compiling)
                self._remember(tenant, key, outcome)
        if isinstance(outcome, str):
            raise GrammarError(outcome)
        return outcome

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._workers_lock:
            for worker in self._workers:
                worker.stop()

    # --- on the executor's threads -------------------------------------------------------

    def _compile(self, kind: str, spec: dict, what: str) -> CompiledGrammar | str:
        """The compiled grammar, or the refusal the client gets."""
        limits = self.limits
        worker = self._worker()
        try:
            reply = worker.compile({"kind": kind, "spec": spec}, limits.compile_timeout_s)
            if reply.get("error") == "memory":  # a MemoryError in Python: that interpreter is not reused
                worker.stop()
                raise WorkerStopped("memory")
        except WorkerStopped as stopped:
            self._local.worker = None
            return {
                "time": f"the {what} took longer than {limits.compile_timeout_s:g} s to compile; simplify it",
                "memory": f"the {what} needs more than {limits.compile_memory_mb} MiB to compile; simplify it",
            }.get(stopped.reason, f"the grammar compiler failed on the {what} ({stopped.reason}); simplify it")
        if "error" in reply:
            return reply["error"]
        try:  # the same work the worker has just done within the limits
            return self.grammars.compiled(reply["grammar"])
        except GrammarError as err:
            return str(err)

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None or not worker.alive:
            if self._setup is None:
                self._setup = json.dumps({"tokenizer": self.grammars.spec, "limits": self.limits.to_dict()}).encode()
            worker = self._local.worker = _Worker(self._setup)
            with self._workers_lock:
                self._workers = [w for w in self._workers if w.alive] + [worker]
        return worker

    # --- the cache (event loop only) -----------------------------------------------------

    def _cached(self, tenant: str, key: str) -> CompiledGrammar | str | None:
        entries = self._cache.get(tenant)
        if entries is None or key not in entries:
            return None
        entries.move_to_end(key)
        return entries[key]

    def _remember(self, tenant: str, key: str, outcome: CompiledGrammar | str) -> None:
        """Keep `outcome` for `tenant`, least recently used out past the count or the bytes it may
        keep; one larger than all those bytes is not kept."""
        limits = self.limits
        if _size(outcome) > limits.cache_bytes_per_tenant:
            return
        entries = self._cache.setdefault(tenant, OrderedDict())
        entries[key] = outcome
        kept = sum(map(_size, entries.values()))
        while len(entries) > limits.cached_per_tenant or kept > limits.cache_bytes_per_tenant:
            kept -= _size(entries.popitem(last=False)[1])


def _size(outcome: CompiledGrammar | str) -> int:
    """What a cached outcome counts against its tenant's bytes: its grammar's text, or the refusal."""
    return len(outcome.text if isinstance(outcome, CompiledGrammar) else outcome)


def _yield_to_the_engine() -> None:
    """Run this thread (the server's rebuild of a grammar a worker accepted) at a lower priority,
    as the workers run: Linux gives each thread its own nice value."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


async def _to_the_end(compiling: asyncio.Future):
    """The compile's outcome. A request cancelled meanwhile (its client left) still waits for it,
    so that its tenant's turn lasts as long as the worker is busy on its behalf, then is cancelled."""
    try:
        return await asyncio.shield(compiling)
    except asyncio.CancelledError:
        await asyncio.wait([compiling])
        raise


class WorkerStopped(Exception):
    """The worker ended during a compile: `reason` "time" (killed when its time was over, or by
    its CPU limit), "memory" (its address space ran out: Rust aborts when an allocation fails),
    or how else it ended."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Worker:
    """One worker process and the JSON lines between it and the server."""

    def __init__(self, setup: bytes) -> None:
        environment = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")])),
            MALLOC_ARENA_MAX="2",  # one arena per thread would reserve address space the cap counts
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.serve.engine.grammar_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # Rust's "memory allocation failed" says nothing the exit status does not
            env=environment,
        )
        self._received = b""
        try:
            self._send(setup)
            self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
        except (OSError, WorkerStopped) as err:
            self.stop()
            raise RuntimeError("the grammar compiler's worker process did not start") from err

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def compile(self, request: dict, timeout_s: float) -> dict:
        """The worker's answer; WorkerStopped when it is killed for time or ends for memory."""
        deadline = time.monotonic() + timeout_s
        try:
            self._send(json.dumps(request).encode())
            return self._receive(deadline)
        except BrokenPipeError:
            stopped = WorkerStopped(self._how_it_ended())
        except WorkerStopped as err:
            stopped = err
        self.stop()
        raise stopped

    def stop(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()

    def _send(self, line: bytes) -> None:
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()

    def _receive(self, deadline: float) -> dict:
        """The next line the worker writes, before `deadline`."""
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerStopped("time")
            readable, _, _ = select.select([descriptor], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(descriptor, 1 << 20)
            if not chunk:  # it ended
                raise WorkerStopped(self._how_it_ended())
            self._received += chunk
        line, _, self._received = self._received.partition(b"\n")
        return json.loads(line)

    def _how_it_ended(self) -> str:
        status = self.process.wait()
        if status == -signal.SIGXCPU:
            return "time"
        if status in (-signal.SIGABRT, -signal.SIGKILL):  # an allocation failed; or the kernel's OOM killer
            return "memory"
        return f"exit status {status}"
