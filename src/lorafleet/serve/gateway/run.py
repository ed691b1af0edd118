"""Running a fleet server: refuse an unsafe address, take the port, start the server, serve it under uvicorn.
The CLI builds the options and receives the messages; nothing here parses or prints."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from lorafleet.errors import ConfigError

if TYPE_CHECKING:  # the server (and torch) only where a server starts: `lorafleet console` needs neither
    from lorafleet.serve.gateway.server import FleetServer, ServeOptions


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, options: ServeOptions) -> None:
    """Without keys anyone who reaches the port could use the fleet: loopback only."""
    if not options.keyed and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without --keys: anyone could use the fleet. "
            "Pass --keys KEYS.yaml, or listen on 127.0.0.1"
        )


def _quiet(message: str) -> None:
    pass


def take_port(host: str, port: int) -> socket.socket:
    """Bind the address before the model loads (minutes for a large base), so that a port in use
    is an error at once, and no other process can take it while we load. Bound as uvicorn binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        if err.errno == errno.EADDRINUSE:
            problem = f"{host}:{port} is already in use (another server listens there, perhaps another lorafleet serve)"
        else:
            problem = f"cannot listen on {host}:{port}: {err.strerror}"
        raise ConfigError(f"{problem}; choose another port with --port N") from err
    return listener


def serve(options: ServeOptions, host: str, port: int, log: Callable[[str], None] = _quiet) -> None:
    import uvicorn

    from lorafleet.serve.gateway.api import create_app
    from lorafleet.serve.gateway.server import FleetServer

    check_address(host, options)
    listener = take_port(host, port)
    try:
        server = FleetServer(options).start()
    except BaseException:
        listener.close()
        raise
    if options.state_url is not None:
        log(f"lorafleet: replica {options.replica_id}: keys, usage and windows in the shared state")
    elif options.tenants is None:
        log(f"lorafleet: no --keys given: requests need no key; listening on {host} only")
    log(f"lorafleet: serving {', '.join(['base', *server.adapters])} on http://{host}:{port}/v1")
    if options.tenants is not None:
        signal.signal(signal.SIGHUP, lambda *_: reload_keys_now(server, log))
        log(f"lorafleet: keys from {options.tenants.source}; `kill -HUP {os.getpid()}` reloads them")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default
    # handler that kills the process before `server.close()` can log the stop. Raised as an
    # exception instead, it unwinds through the `finally` below.
    signal.signal(signal.SIGTERM, _exit)
    try:
        app = create_app(server)
        web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        app.state.console.stopping = lambda: web.should_exit  # an open console tab must not hold up the stop
        web.run(sockets=[listener])
    finally:
        server.close()


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def reload_keys_now(server: FleetServer, log: Callable[[str], None]) -> None:
    """What SIGHUP does: reload the keys file, saying whether it worked (a bad file keeps the old
    keys). It never raises: an exception out of a signal handler would stop the server."""
    try:
        described = server.reload_keys({"tenant": None, "key_id": None, "signal": "SIGHUP"})
        log(f"lorafleet: keys reloaded: {len(described['tenants'])} tenants (sha256 {described['sha256'][:16]})")
    except ConfigError as err:
        log(f"lorafleet: keys NOT reloaded, the previous keys stay in force: {err}")
    except Exception as err:  # noqa: BLE001 - e.g. the audit log failing: report it, keep serving
        log(f"lorafleet: keys NOT reloaded, the previous keys stay in force: {type(err).__name__}: {err}")
