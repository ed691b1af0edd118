"""Real PostgreSQL and Redis servers for the tests of the shared serving state, each started in a
temporary directory on a free port of 127.0.0.1 and stopped at the end. Never a mock.

PostgreSQL refuses to run as root: run as root (as CI does), its processes run as `nobody`.
Without the binaries the tests that need them are skipped, except under CI (CI=true), where
.ci/run installs them and their absence is an error.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

UNPRIVILEGED = "nobody"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing(what: str) -> None:
    """Skip the test, or fail it under CI, where .ci/run should have installed `what`."""
    message = f"{what} is not installed (apt-get install {what}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _wait_until(ready, what: str, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {seconds} s; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


class PostgresServer:
    """A PostgreSQL cluster of its own: `database()` gives each test a fresh database's URL;
    `stop()` then `start()` brings it back on the same port with its data."""

    def __init__(self) -> None:
        bindir = _postgres_bindir()
        if bindir is None:
            missing("postgresql")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))  # /tmp: reachable by the unprivileged user
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen | None = None
        as_user = {}
        if os.geteuid() == 0:
            shutil.chown(self.root, UNPRIVILEGED)
            as_user = {"user": UNPRIVILEGED, "group": "nogroup", "extra_groups": []}
        self._as_user = as_user
        self._run("initdb", "-D", str(self.root / "data"), "-U", "lorafleet", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> PostgresServer:
        settings = ["fsync=off", "synchronous_commit=off", "full_page_writes=off", "listen_addresses=127.0.0.1"]
        command = [str(self.bindir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port)]
        command += ["-k", str(self.root)] + [arg for setting in settings for arg in ("-c", setting)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, **self._as_user)
        _wait_until(self._accepts, "PostgreSQL", self.log)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://lorafleet@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (`start()` brings it back, data and all)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients still connected are cut off
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _accepts(self) -> bool:
        import psycopg

        if self.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited; its log:\n{self.log.read_text()[-3000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120, **self._as_user
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


class RedisServer:
    """A redis-server of its own; `stop()` then `start()` brings it back on the same port, empty."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            missing("redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="lorafleet-redis-"))
        self.port = free_port()
        self.log = self.root / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.root), "--logfile", str(self.log)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self.answers, "redis-server", self.log)
        return self

    def answers(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_bindir() -> Path | None:
    """The newest PostgreSQL's binaries: Debian keeps them in /usr/lib/postgresql/N/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database of the session's PostgreSQL."""
    return postgres_server.database()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied."""
    redis_server.flush()
    return redis_server.url
