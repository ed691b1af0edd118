"""`lorafleet console`: the console alone, for a fleet that is only being trained (no model is
loaded, nothing is served): its runs live, its lineage, its documents and its audit log.

The same rule as `lorafleet serve`: without a keys file it listens on loopback only; with one,
every /ui/api call needs an admin key from it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lorafleet.errors import ConfigError
from lorafleet.serve.gateway.console.app import Console, create_console_app
from lorafleet.serve.gateway.run import is_loopback, take_port
from lorafleet.serve.gateway.tenants import TenantDirectory


def run_console(
    fleet_dir: Path, tenants: TenantDirectory | None, host: str, port: int, log: Callable[[str], None]
) -> None:
    import uvicorn

    if not fleet_dir.is_dir():
        raise ConfigError(f"--fleet {fleet_dir} is not a directory: pass the fleet's output directory")
    if tenants is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without --keys: anyone could read the fleet's records. "
            "Pass --keys KEYS.yaml (an admin key opens the console), or listen on 127.0.0.1"
        )
    listener = take_port(host, port)
    console = Console(fleet_dir, lambda: tenants)
    app = create_console_app(console)
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    console.stopping = lambda: web.should_exit
    log(f"lorafleet: console of {fleet_dir} on http://{host}:{port}/ui/" + (" (admin key needed)" if tenants else ""))
    web.run(sockets=[listener])
