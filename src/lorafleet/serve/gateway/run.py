"""Running a fleet server: refuse an unsafe address, start the server, serve it under uvicorn.
The CLI builds the options and receives the messages; nothing here parses or prints."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from lorafleet.errors import ConfigError
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
    if options.tenants is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without --keys: anyone could use the fleet. "
            "Pass --keys KEYS.yaml, or listen on 127.0.0.1"
        )


def _quiet(message: str) -> None:
    pass


def serve(options: ServeOptions, host: str, port: int, log: Callable[[str], None] = _quiet) -> None:
    import uvicorn

    from lorafleet.serve.gateway.api import create_app

    check_address(host, options)
    server = FleetServer(options).start()
    if options.tenants is None:
        log(f"lorafleet: no --keys given: requests need no key; listening on {host} only")
    log(f"lorafleet: serving {', '.join(['base', *server.adapters])} on http://{host}:{port}/v1")
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        server.close()
