"""`lorafleet serve`: build the server from command-line options and run it under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from lorafleet.errors import ConfigError
from lorafleet.serve.images import ImagePolicy
from lorafleet.serve.server import FleetServer, ServeOptions
from lorafleet.serve.tenants import load_tenants


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    tenants = load_tenants(args.keys) if args.keys else None
    if tenants is None and not is_loopback(args.host):
        raise ConfigError(
            f"refusing to listen on {args.host} without --keys: anyone could use the fleet. "
            "Pass --keys KEYS.yaml, or listen on 127.0.0.1"
        )
    policy = ImagePolicy(allowed_dirs=list(args.allow_image_dir), allowed_hosts=list(args.allow_image_host))
    return ServeOptions(
        fleet_dir=args.fleet,
        base_dir=args.base,
        tenants=tenants,
        image_policy=policy,
        log_content=args.log_content,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
    )


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from lorafleet.serve.api import create_app

    options = options_from_args(args)
    server = FleetServer(options).start()
    if options.tenants is None:
        print(f"lorafleet: no --keys given: requests need no key; listening on {args.host} only", file=sys.stderr)
    print(
        f"lorafleet: serving {', '.join(['base', *server.adapters])} on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.close()
