"""`lorafleet audit`, `registry` and `docs`: the audit log, the lineage registry and the drafted documents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_governance_parsers(commands: argparse._SubParsersAction) -> None:
    _add_audit_parser(commands)
    _add_registry_parser(commands)
    _add_docs_parser(commands)


def _add_audit_parser(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify, export, sign or prune a fleet's hash-chained audit log",
        description="The audit log in DIR/audit/ records training, serving and administration, each entry "
        "holding the SHA-256 of the one before it.",
    )
    actions = audit.add_subparsers(title="actions", metavar="ACTION", required=True)
    for add_action in (_add_verify, _add_export, _add_keygen, _add_sign, _add_prune):
        add_action(actions)
    audit.set_defaults(command="audit")


def _add_verify(actions: argparse._SubParsersAction) -> None:
    verify = actions.add_parser("verify", help="check the chain; exit 1 naming the first bad entry")
    verify.add_argument("dir", type=Path, help="fleet directory (or its audit/ directory, or an exported file)")
    verify.add_argument("--public-key", type=Path, help="also check the signed checkpoints with this public key")
    verify.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="with --public-key, also check this copy of checkpoints.jsonl, kept where the fleet's host cannot write",
    )
    verify.set_defaults(run=_run_audit_verify)


def _run_audit_verify(args: argparse.Namespace) -> int:
    from lorafleet.errors import AuditError, ConfigError
    from lorafleet.governance.audit import verify_chain
    from lorafleet.governance.retention import describe_retention
    from lorafleet.governance.signing import load_public_key, verify_checkpoints

    if args.checkpoints and not args.public_key:
        raise ConfigError("--checkpoints needs --public-key: the copy is checked by its signatures")
    key = load_public_key(args.public_key) if args.public_key else None  # a bad key file is a usage error
    for name, path in _audit_chains(args.dir):
        try:
            report = verify_chain(path)
            signed = (
                verify_checkpoints(path, key, report, args.checkpoints if name == "audit log" else None)
                if key
                else None
            )
        except AuditError as err:
            print(f"lorafleet: {name} NOT valid: {err}", file=sys.stderr)
            return 1
        print(f"{name} valid: {report.entries} entries, seq {report.first_seq}..{report.last_seq}")
        for line in describe_retention(report):
            print(line)
        if signed is not None:
            print(f"signed checkpoints: {signed.checked} verified, {signed.before_retention} before retention")
    return 0


def _audit_chains(path: Path) -> list[tuple[str, Path]]:
    """The chains to verify: the fleet's own, and each gateway replica's (lorafleet serve --state),
    whose chain lies in the fleet directory under the replica's id. A fleet only served by
    replicas may have no chain of its own."""
    from lorafleet.fleet_dir import FleetDir
    from lorafleet.governance.audit import audit_dir, list_segments

    replicas = [(f"replica {chain.parent.name}'s audit log", chain) for chain in FleetDir(path).replica_audits()]
    if replicas and path.is_dir() and not list_segments(audit_dir(path)):
        return replicas
    return [("audit log", path), *replicas]


def _add_export(actions: argparse._SubParsersAction) -> None:
    export = actions.add_parser(
        "export",
        help="copy entries to a file, or stream them (as the chain grows) to syslog or an OTLP collector",
        description="Without --follow, --to, --from-seq, --state or --format: the entries of a time range, as "
        "stored, to one JSONL file. Otherwise every entry from a sequence number on, in chain order, each "
        "carrying its seq, hash and prev so the copy alone shows gaps and reordering: to --out (a file, or - "
        "for stdout) or --to syslog://HOST:PORT (RFC 5424 over UDP), syslog+tcp://HOST:PORT (RFC 5424, RFC "
        "6587 octet counting) or an OTLP/HTTP logs URL (http(s)://HOST:4318/v1/logs, JSON encoding). "
        "docs/security.md says what each guarantees.",
    )
    export.add_argument("dir", type=Path, help="fleet directory")
    export.add_argument("--since", help="first time included (ISO 8601, UTC unless given, e.g. 2026-11-01)")
    export.add_argument("--until", help="first time excluded (ISO 8601)")
    export.add_argument("--out", type=Path, help="the file to write (- for stdout)")
    export.add_argument(
        "--to", metavar="URL", help="syslog://HOST:PORT, syslog+tcp://HOST:PORT or http(s)://.../v1/logs"
    )
    export.add_argument("--format", choices=["jsonl", "cef", "syslog"], help="line format of --out (default jsonl)")
    export.add_argument("--follow", action="store_true", help="keep going: ship entries as they are appended")
    export.add_argument("--from-seq", type=int, metavar="N", help="start at entry N (default: the first)")
    export.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="the last entry delivered is kept here; a restarted export resumes after it (no entry lost, none twice)",
    )
    export.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="with --follow (default: 1)")
    export.set_defaults(run=_run_audit_export)


def _run_audit_export(args: argparse.Namespace) -> int:
    from lorafleet.errors import ConfigError
    from lorafleet.governance.audit import export_entries

    streaming = args.follow or args.to or args.from_seq is not None or args.state or args.format
    if not streaming:
        if args.out is None:
            raise ConfigError("audit export needs --out FILE (or --to URL to stream to a collector)")
        count = export_entries(args.dir, args.out, args.since, args.until)
        print(f"{count} entries written to {args.out}")
        return 0
    if args.since or args.until:
        raise ConfigError("--since/--until select a time range for one file; streaming starts at --from-seq")
    if bool(args.out) == bool(args.to):
        raise ConfigError("give either --out FILE (- for stdout) or --to URL")
    return _stream_audit(args)


def _stream_audit(args: argparse.Namespace) -> int:
    import signal
    import threading

    from lorafleet.governance.export import ChainReader, Cursor
    from lorafleet.governance.shipping import Delivery, open_destination, ship_chain

    cursor = Cursor.load(args.state) if args.state else None
    after = (cursor.seq, cursor.hash) if cursor and cursor.seq else ((args.from_seq or 1) - 1, None)
    destination = open_destination(args.to or str(args.out), args.format or "jsonl")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # stop after the batch in flight; the cursor says where
        signal.signal(signum, lambda *_: stop.set())
    delivery = Delivery(destination, cursor, stop)
    try:
        count = ship_chain(ChainReader(args.dir, *after), delivery, args.follow, args.poll)
    finally:
        destination.close()
    where = f" (state: {args.state}, last seq {cursor.seq})" if cursor else ""
    print(f"{count} entries delivered to {args.to or args.out}{where}", file=sys.stderr)
    return 0


def _add_keygen(actions: argparse._SubParsersAction) -> None:
    keygen = actions.add_parser("keygen", help="a new Ed25519 key pair for signing checkpoints")
    keygen.add_argument("key", type=Path, help="private key file to create (the public key goes to KEY.pub)")
    keygen.set_defaults(run=_run_audit_keygen)


def _run_audit_keygen(args: argparse.Namespace) -> int:
    from lorafleet.governance.signing import generate_key

    public = generate_key(args.key)
    print(f"private key: {args.key}   (keep it off the fleet's host)\npublic key:  {public}")
    return 0


def _add_sign(actions: argparse._SubParsersAction) -> None:
    sign = actions.add_parser("sign", help="sign the chain's newest entry (run periodically, e.g. from cron)")
    sign.add_argument("dir", type=Path, help="fleet directory")
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key (lorafleet audit keygen)")
    sign.set_defaults(run=_run_audit_sign)


def _run_audit_sign(args: argparse.Namespace) -> int:
    from lorafleet.governance.signing import load_private_key, sign_checkpoint

    checkpoint = sign_checkpoint(args.dir, load_private_key(args.key))
    print(f"signed entry seq {checkpoint['seq']} ({checkpoint['hash'][:16]}...)")
    return 0


def _add_prune(actions: argparse._SubParsersAction) -> None:
    prune = actions.add_parser(
        "prune",
        help="delete whole months of entries (and logged requests) older than the retention period",
        description="Providers and deployers of high-risk AI systems keep the logs it generates at least six "
        "months (EU AI Act Art. 19(1), 26(6)). Each deletion is recorded in the log, with who and when.",
    )
    prune.add_argument("dir", type=Path, help="fleet directory")
    prune.add_argument(
        "--keep-days",
        type=int,
        help="keep entries this many days, at least the stored retention "
        "(default: the fleet config's audit_keep_days, as stored in DIR/audit/)",
    )
    prune.add_argument("--key", type=Path, help="Ed25519 private key: sign a checkpoint after pruning")
    prune.set_defaults(run=_run_audit_prune)


def _run_audit_prune(args: argparse.Namespace) -> int:
    from lorafleet.errors import AuditError
    from lorafleet.governance.retention import check_keep_days, prune, retention_days
    from lorafleet.governance.signing import load_private_key, sign_checkpoint
    from lorafleet.serve.gateway.request_log import apply_request_retention

    keep_days = args.keep_days if args.keep_days is not None else retention_days(args.dir)
    if keep_days is None:
        raise AuditError(f"{args.dir}: no retention period stored; pass --keep-days or set audit_keep_days")
    warning = check_keep_days(keep_days, "--keep-days" if args.keep_days is not None else "audit_keep_days")
    if warning:
        print(f"lorafleet: warning: {warning}", file=sys.stderr)
    key = load_private_key(args.key) if args.key else None
    deleted = prune(args.dir, keep_days, via="lorafleet audit prune")
    rows = apply_request_retention(args.dir, keep_days, via="lorafleet audit prune")
    print(f"deleted {len(deleted)} monthly segments: {', '.join(p.name for p in deleted) or 'none'}")
    print(f"deleted {rows} logged requests older than {keep_days} days")
    if key is not None:
        checkpoint = sign_checkpoint(args.dir, key)
        print(f"signed entry seq {checkpoint['seq']} ({checkpoint['hash'][:16]}...)")
    return 0


def _add_registry_parser(commands: argparse._SubParsersAction) -> None:
    registry = commands.add_parser(
        "registry",
        help="what made each adapter and model: data and base hashes, configs, losses, parents, children",
        description="Read the lineage registry (lorafleet.sqlite) of one or more fleet directories.",
    )
    actions = registry.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, helptext, names in (
        ("list", "every adapter and model registered", []),
        ("show", "one record: base, data, configs, loss, compute, parents and children", ["name"]),
        ("diff", "the fields in which two records differ", ["a", "b"]),
    ):
        action = actions.add_parser(name, help=helptext)
        for positional in names:
            action.add_argument(positional, help="a name, or the start of an id (8 characters or more)")
        action.add_argument(
            "--fleet",
            type=Path,
            action="append",
            required=True,
            help="fleet directory; repeat to look in several (children are found in every one)",
        )
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(run=_run_registry, action=name)
    registry.set_defaults(command="registry")


def _run_registry(args: argparse.Namespace) -> int:
    import json

    from lorafleet.governance import registry as lineage_registry

    registries = [lineage_registry.Registry.open(fleet) for fleet in args.fleet]
    if args.action == "list":
        records = [lineage for registry in registries for lineage in registry.all()]
        print(
            json.dumps([r.to_dict() for r in records], indent=2)
            if args.json
            else lineage_registry.format_table(records)
        )
    elif args.action == "show":
        lineage, _ = lineage_registry.find_in(registries, args.name)
        children = lineage_registry.children_in(registries, lineage)
        if args.json:
            links = [{"relation": relation, "name": name, "id": child} for relation, name, child in children]
            print(json.dumps(lineage.to_dict() | {"children": links}, indent=2))
        else:
            print(lineage_registry.format_record(lineage, children))
    else:
        (a, _), (b, _) = lineage_registry.find_in(registries, args.a), lineage_registry.find_in(registries, args.b)
        changed = lineage_registry.diff(a, b)
        if args.json:
            print(json.dumps([{"field": key, "a": x, "b": y} for key, x, y in changed], indent=2))
        else:
            print(f"{len(changed)} fields differ between {a.name} ({a.id[:12]}) and {b.name} ({b.id[:12]})")
            for key, x, y in changed:
                print(f"  {key}: {x!r} -> {y!r}")
    return 0


def _add_docs_parser(commands: argparse._SubParsersAction) -> None:
    docs = commands.add_parser(
        "docs",
        help="draft a model card (README.md) and EU AI Act Annex IV documentation for an adapter",
        description="Write README.md (a Hugging Face model card) and annex-iv.md into the adapter's directory, "
        "filled from the registry and the audit log; what only the provider can answer is marked "
        "PROVIDER MUST COMPLETE.",
    )
    docs.add_argument("name", help="adapter or model name (or the start of its id)")
    docs.add_argument(
        "--fleet", type=Path, action="append", required=True, help="fleet directory (repeat to look in several)"
    )
    docs.set_defaults(command="docs", run=_run_docs)


def _run_docs(args: argparse.Namespace) -> int:
    from lorafleet.governance.documents import PROVIDER_MUST_COMPLETE, write_documents
    from lorafleet.governance.registry import Registry, find_in

    registries = [Registry.open(fleet) for fleet in args.fleet]
    lineage, registry = find_in(registries, args.name)
    documents = write_documents(lineage, registries, registry.fleet_dir)
    todo = documents.annex.read_text().count(PROVIDER_MUST_COMPLETE)
    print(f"model card: {documents.card}")
    print(f"Annex IV draft: {documents.annex} ({todo} places marked PROVIDER MUST COMPLETE)")
    if documents.audit_problem:
        print(
            f"lorafleet: the fleet's audit log does NOT verify, and the drafts say so: {documents.audit_problem}",
            file=sys.stderr,
        )
        return 1
    return 0
