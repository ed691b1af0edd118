"""`lorafleet serve`: the fleet behind the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the base and every adapter behind an OpenAI-compatible API",
        description="Serve a fleet directory (base/ and adapters/<name>/) with an OpenAI-compatible API.",
    )
    serve.add_argument("--fleet", type=Path, required=True, help="fleet directory, e.g. demo-out")
    serve.add_argument("--base", type=Path, help="base model directory (default: <fleet>/base)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--keys", type=Path, help="KEYS.yaml: tenants, their keys, adapters and limits")
    serve.add_argument(
        "--state",
        metavar="postgresql://…",
        help="keep keys, tenants, usage and the request log in this PostgreSQL database, shared by every "
        "replica (with --redis; the keys file, if given, is imported at start; pip install 'lorafleet[replicas]')",
    )
    serve.add_argument(
        "--redis", metavar="redis://…", help="keep the rate and token windows in this Redis (with --state)"
    )
    serve.add_argument(
        "--replica-id", help="this replica's name in the request log (default: the host name and process id)"
    )
    serve.add_argument(
        "--price-input", type=float, default=0.0, help="what a million prompt tokens cost, for usage and budgets"
    )
    serve.add_argument(
        "--price-output", type=float, default=0.0, help="what a million completion tokens cost (as lorafleet cost)"
    )
    serve.add_argument(
        "--state-unavailable",
        choices=["closed", "open"],
        default="closed",
        help="when Redis cannot be reached: closed refuses requests with 503; open holds each tenant to its "
        "limits on this replica alone (N replicas: up to N times a limit). PostgreSQL out of reach is always 503",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)")
    serve.add_argument(
        "--max-tenant-rows",
        type=_positive_int,
        metavar="N",
        help="rows of the batch one tenant's requests hold at once (default: half of --max-batch with --keys, "
        "so another tenant always finds rows free; all of it without)",
    )
    serve.add_argument(
        "--max-seq-len",
        type=int,
        default=4096,
        help="tokens per request, prompt and reply (default: 4096, at most the model's context); "
        "the KV cache holds this many for each of --max-batch rows, allocated at start",
    )
    serve.add_argument("--log-content", action="store_true", help="also store prompts and replies in the log")
    serve.add_argument(
        "--audit-key",
        type=Path,
        help="Ed25519 private key (lorafleet audit keygen): sign checkpoints of the audit log at start, "
        "every --audit-sign-every seconds and at shutdown",
    )
    serve.add_argument(
        "--audit-sign-every",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="with --audit-key, seconds between signed checkpoints while requests come in (default: 3600)",
    )
    serve.add_argument(
        "--audit-ship-to",
        metavar="URL",
        help="also ship each audit entry as it is written: syslog://HOST:PORT (UDP), syslog+tcp://HOST:PORT or an "
        "OTLP/HTTP logs URL; resumes where the last server stopped (docs/security.md)",
    )
    serve.add_argument(
        "--audit-ship-queue",
        type=int,
        default=10_000,
        metavar="N",
        help="entries held for shipping at most (default 10000); more are counted and shipped later from the log",
    )
    serve.add_argument(
        "--manage-keys",
        action="store_true",
        help="with --keys, the web console (/ui) may create, revoke and rotate keys; it rewrites the keys file "
        "(comments in it are not kept) and reloads it",
    )
    serve.add_argument(
        "--serve-withdrawn",
        action="store_true",
        help="load adapters the fleet's registry has withdrawn (lorafleet data forget) all the same",
    )
    serve.add_argument(
        "--allow-image-dir",
        type=Path,
        action="append",
        default=[],
        help="directory file:// image URLs may come from (repeatable)",
    )
    serve.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="host (and port; default the scheme's) http(s) image URLs may come from (repeatable); "
        "redirects are never followed",
    )
    serve.add_argument(
        "--image-fetch-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="the whole fetch of an allowed http(s) image, connecting to the last byte (default: 10)",
    )
    serve.add_argument("--max-images", type=int, default=8, help="images per request (default: 8)")
    serve.add_argument(
        "--max-tiles", type=int, help="image tiles for every model (default: as each adapter was trained)"
    )
    serve.add_argument("--max-body-mb", type=float, default=32, help="request body size limit, MiB (default: 32)")
    _add_grammar_limits(serve)
    serve.add_argument(
        "--max-tenant-requests",
        type=_positive_int,
        default=32,
        metavar="N",
        help="one tenant's requests in flight at once; more wait their turn (default: 32)",
    )
    serve.add_argument(
        "--max-tenant-waiting",
        type=_positive_int,
        default=128,
        metavar="N",
        help="one tenant's requests waiting for a place in flight; past this, 429 (default: 128)",
    )
    serve.add_argument(
        "--prepare-threads",
        type=_positive_int,
        default=8,
        metavar="N",
        help="threads fetching images and tokenising prompts off the event loop; with --keys one tenant holds "
        "at most half of them (default: 8)",
    )
    _add_request_limits(serve)
    serve.add_argument(
        "--public-metrics", action="store_true", help="with --keys, serve /metrics without a key (default: key needed)"
    )
    serve.add_argument(
        "--engine",
        choices=["local", "vllm"],
        default="local",
        help="local: lorafleet's engine in this process; vllm: start vLLM with the fleet's adapters",
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="attach to a running vLLM (or other OpenAI-compatible server) instead of generating here",
    )
    serve.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help="the python of the environment vLLM is installed in (it cannot share lorafleet's: it pins another "
        "transformers), e.g. ~/vllm-env/bin/python (default: a vllm executable on PATH, else this Python)",
    )
    serve.add_argument("--vllm-port", type=int, default=8100, help="port for the vLLM process (default: 8100)")
    serve.add_argument(
        "--vllm-max-loras",
        type=int,
        help="adapters vLLM holds on the GPU at once (default: the fleet's size, at most 8)",
    )
    serve.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for `vllm serve`, after lorafleet's (repeatable; "
        "e.g. --vllm-arg=--gpu-memory-utilization=0.8)",
    )
    serve.set_defaults(command="serve", run=_run_serve)


# Structured output's limits: flag -> (GrammarLimits field, the unit the flag counts in bytes or ms, help).
# Their defaults live in GrammarLimits alone (importing it here would load llguidance for every command).
GRAMMAR_FLAGS = {
    "--max-schema-kb": ("max_schema_bytes", 1024, "a response_format schema's size as JSON, KiB (default: 128)"),
    "--max-tools-kb": ("max_tools_bytes", 1024, "a request's tools' size as JSON, KiB (default: 128)"),
    "--max-schema-depth": ("max_schema_depth", 1, "objects and arrays nested in a schema or the tools (default: 32)"),
    "--grammar-timeout": ("compile_timeout_s", 1, "seconds one grammar may take to compile, else 400 (default: 10)"),
    "--grammar-memory-mb": ("compile_memory_mb", 1, "MiB a grammar's compile may take, else 400 (default: 1024)"),
    "--grammar-workers": ("compile_workers", 1, "processes compiling grammars; one per tenant at a time (default: 2)"),
    "--mask-budget-ms": ("mask_budget_ms", 1, "the most a decode step waits for grammar masks; a row later than that "
                         "fails alone with a 400 (default: 50)"),
}  # fmt: skip


def _add_grammar_limits(serve: argparse.ArgumentParser) -> None:
    for flag, (_, _, help_text) in GRAMMAR_FLAGS.items():
        serve.add_argument(flag, type=float, help=help_text)


def _grammar_limits(args: argparse.Namespace):
    from dataclasses import fields

    from lorafleet.serve.engine.grammar import GrammarLimits

    kinds = {field.name: field.type for field in fields(GrammarLimits)}
    given = {}
    for flag, (name, unit, _) in GRAMMAR_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            given[name] = int(value * unit) if kinds[name] == "int" else value * unit
    return GrammarLimits(**given)


# What one request may ask for (flag, RequestLimits field, help); the defaults are RequestLimits' own. The
# size of its tools is a grammar limit (--max-tools-kb, above).
_REQUEST_LIMITS = (
    ("--max-prompts", "max_prompts", "prompts in one /v1/completions request (default: 64)"),
    ("--max-choices", "max_choices", "replies one request asks for, n x prompts (default: 128)"),
    ("--max-stop", "max_stop", "stop strings per request (default: 4, as OpenAI)"),
    ("--max-stop-chars", "max_stop_chars", "characters in each stop string (default: 256)"),
    ("--max-tools", "max_tools", "tools per chat request (default: 128, as OpenAI)"),
    ("--max-json-depth", "max_json_depth", "nesting of a request body's arrays and objects (default: 64)"),
)


def _add_request_limits(serve: argparse.ArgumentParser) -> None:
    for flag, _, help_text in _REQUEST_LIMITS:
        serve.add_argument(flag, type=_positive_int, metavar="N", help=help_text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value


def _request_limits(args: argparse.Namespace):
    from lorafleet.serve.gateway.protocol import RequestLimits

    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in _REQUEST_LIMITS}
    return RequestLimits(**{field: value for field, value in given.items() if value is not None})


def _run_serve(args: argparse.Namespace) -> int:
    from lorafleet.serve.gateway.run import serve

    serve(serve_options(args), args.host, args.port, log=lambda message: print(message, file=sys.stderr))
    return 0


def serve_options(args: argparse.Namespace):
    """The server's options from `lorafleet serve`'s flags."""
    from lorafleet.errors import ConfigError
    from lorafleet.serve.gateway.images import ImagePolicy
    from lorafleet.serve.gateway.server import ServeOptions
    from lorafleet.serve.gateway.state import Prices
    from lorafleet.serve.gateway.tenants import load_tenants

    if args.manage_keys and not args.keys:
        raise ConfigError("--manage-keys needs --keys FILE: the console manages the keys in that file")
    return ServeOptions(
        fleet_dir=args.fleet,
        base_dir=args.base,
        tenants=load_tenants(args.keys) if args.keys else None,
        image_policy=ImagePolicy(
            allowed_dirs=list(args.allow_image_dir),
            allowed_hosts=list(args.allow_image_host),
            fetch_timeout_s=args.image_fetch_seconds,
        ),
        log_content=args.log_content,
        max_batch=args.max_batch,
        max_tenant_rows=args.max_tenant_rows,
        max_seq_len=args.max_seq_len,
        max_images=args.max_images,
        max_tiles=args.max_tiles,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_tenant_requests=args.max_tenant_requests,
        max_tenant_waiting=args.max_tenant_waiting,
        prepare_threads=args.prepare_threads,
        limits=_request_limits(args),
        public_metrics=args.public_metrics,
        engine=args.engine,
        upstream_url=args.upstream,
        vllm_port=args.vllm_port,
        vllm_args=list(args.vllm_arg),
        vllm_gpu_slots=args.vllm_max_loras,
        vllm_python=args.vllm_python.expanduser() if args.vllm_python else None,
        audit_key=args.audit_key,
        audit_sign_every_s=args.audit_sign_every,
        serve_withdrawn=args.serve_withdrawn,
        audit_ship_to=args.audit_ship_to,
        audit_ship_queue=args.audit_ship_queue,
        grammar_limits=_grammar_limits(args),
        manage_keys=args.manage_keys,
        state_url=args.state,
        state_unavailable=args.state_unavailable,
        prices=Prices(args.price_input, args.price_output),
        redis_url=args.redis,
        **({"replica_id": args.replica_id} if args.replica_id else {}),
    )
