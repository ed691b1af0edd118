"""`lorafleet console`: the web console of a fleet directory, without serving it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_console_parser(commands: argparse._SubParsersAction) -> None:
    console = commands.add_parser(
        "console",
        help="the web console alone, for a fleet being trained: runs, lineage, documents, audit log",
        description="Serve the web console of a fleet directory at /ui without loading a model "
        "(`lorafleet serve` serves the same console beside the API, with the playground and serving pages).",
    )
    console.add_argument("--fleet", type=Path, required=True, help="fleet directory, e.g. demo-out")
    console.add_argument("--host", default="127.0.0.1")
    console.add_argument("--port", type=int, default=8000)
    console.add_argument("--keys", type=Path, help="KEYS.yaml: the console then needs an admin key from it")
    console.set_defaults(command="console", run=_run_console)


def _run_console(args: argparse.Namespace) -> int:
    from lorafleet.serve.gateway.console.standalone import run_console
    from lorafleet.serve.gateway.tenants import load_tenants

    tenants = load_tenants(args.keys) if args.keys else None
    run_console(args.fleet, tenants, args.host, args.port, log=lambda message: print(message, file=sys.stderr))
    return 0
