"""`lorafleet keys` and `lorafleet usage`: keys for a keys file (new, hash), and keys, tenants and
usage managed live through a running gateway's admin API (create, list, revoke, rotate; usage).

The admin key is read from LORAFLEET_ADMIN_KEY, never from the command line, where any user of
the machine could read it in the process list.
"""

from __future__ import annotations

import argparse
import os
import sys

ADMIN_KEY_VARIABLE = "LORAFLEET_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"


def add_keys_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser(
        "keys", help="API keys: for KEYS.yaml (new, hash), or live on a running gateway (create, list, revoke, rotate)"
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("new", help="a fresh random key and its hash, for KEYS.yaml")
    hashed = actions.add_parser("hash", help="the hash of KEY, for KEYS.yaml")
    hashed.add_argument("key", help="the key to hash")

    create = _admin_parser(actions, "create", "a new key for TENANT (created or changed with the options given)")
    create.add_argument("tenant")
    create.add_argument("--expires", metavar="ISO-TIME", help="when the key stops working (UTC unless a zone is given)")
    create.add_argument("--adapters", help="comma-separated adapters the tenant may use, or '*' for all")
    create.add_argument("--admin", action="store_true", help="the tenant may administer the gateway")
    create.add_argument("--rpm", type=int, help="the tenant's requests per minute")
    create.add_argument("--tpm", type=int, help="the tenant's tokens per minute")
    create.add_argument("--monthly-tokens", type=int, help="the tenant's tokens per calendar month")
    create.add_argument("--monthly-cost", type=float, help="the tenant's spend per calendar month")
    create.add_argument("--max-rows", type=int, help="rows of the engine's batch the tenant's requests hold at once")
    listed = _admin_parser(actions, "list", "the keys (ids, never the keys) and whose they are")
    listed.add_argument("--tenant", help="only this tenant's")
    for action, text in (("revoke", "revoke the key KEY_ID at once"), ("rotate", "a new key; KEY_ID revoked")):
        _admin_parser(actions, action, text).add_argument("key_id", help="the key's id (lorafleet keys list)")
    keys.set_defaults(command="keys", run=_run_keys)


def add_usage_parser(commands: argparse._SubParsersAction) -> None:
    usage = _admin_parser(commands, "usage", "tokens and requests per day, tenant and model, from a running gateway")
    usage.add_argument("--since", metavar="YYYY-MM-DD", help="from this day on (UTC; default: the month's first)")
    usage.add_argument("--tenant", help="only this tenant's")
    usage.set_defaults(command="usage", run=_run_usage)


def _admin_parser(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=text, description=f"{text}. The admin key is read from ${ADMIN_KEY_VARIABLE}."
    )
    parser.add_argument("--url", default=os.environ.get("LORAFLEET_URL", DEFAULT_URL), help="the gateway's address")
    return parser


def _run_keys(args: argparse.Namespace) -> int:
    if args.action in ("new", "hash"):
        return _keys_file_key(args)
    client = _client(args)
    if args.action == "create":
        settings = _tenant_settings(args)
        if settings:
            known = {tenant["name"]: tenant for tenant in client.tenants()}.get(args.tenant, {"name": args.tenant})
            client.put_tenant({k: v for k, v in known.items() if k != "object"} | settings)
        _print_issued(client.create_key(args.tenant, args.expires))
    elif args.action == "list":
        for key in client.keys(args.tenant):
            state = f"revoked {key['revoked_at']}" if key["revoked_at"] else f"expires {key['expires_at'] or 'never'}"
            print(f"{key['id']}  {key['tenant']:<24} created {key['created_at'] or '-'}  {state}")
    elif args.action == "revoke":
        revoked = client.revoke_key(args.key_id)
        print(f"revoked {revoked['id']} ({revoked['tenant']}) at {revoked['revoked_at']}")
    else:
        _print_issued(client.rotate_key(args.key_id))
        print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def _run_usage(args: argparse.Namespace) -> int:
    rows = _client(args).usage(args.since, args.tenant)
    print(f"{'day':<10}  {'tenant':<24} {'model':<24} {'requests':>9} {'prompt':>11} {'completion':>11} {'cost':>10}")
    for row in rows:
        tenant = row["tenant"] or "-"
        print(
            f"{row['day']:<10}  {tenant:<24} {row['model']:<24} {row['requests']:>9} "
            f"{row['prompt_tokens']:>11} {row['completion_tokens']:>11} {row['cost']:>10.4f}"
        )
    return 0


def _keys_file_key(args: argparse.Namespace) -> int:
    import secrets

    from lorafleet.serve.gateway.tenants import hash_key

    key = args.key if args.action == "hash" else "sk-lf-" + secrets.token_urlsafe(32)
    if args.action == "new":
        print(f"key:        {key}   (give this to the tenant; it is not stored)")
    print(f"key_sha256: {hash_key(key)}")
    return 0


def _client(args: argparse.Namespace):
    from lorafleet.serve.gateway.admin_client import AdminClient

    return AdminClient(args.url, os.environ.get(ADMIN_KEY_VARIABLE))


def _tenant_settings(args: argparse.Namespace) -> dict:
    """The tenant settings given on the command line (nothing given: the tenant stays as it is)."""
    given = {
        "adapters": ("*" if args.adapters.strip() == "*" else [a for a in args.adapters.split(",") if a])
        if args.adapters is not None
        else None,
        "requests_per_minute": args.rpm,
        "tokens_per_minute": args.tpm,
        "monthly_token_budget": args.monthly_tokens,
        "monthly_cost_budget": args.monthly_cost,
        "max_rows": args.max_rows,
    }
    settings = {name: value for name, value in given.items() if value is not None}
    return settings | ({"admin": True} if args.admin else {})


def _print_issued(issued: dict) -> None:
    print(f"key:    {issued['key']}   (give this to the tenant; it is shown once and stored only as a hash)")
    print(f"id:     {issued['id']}")
    print(f"tenant: {issued['tenant']}")
    print(f"expires: {issued['expires_at'] or 'never'}")
