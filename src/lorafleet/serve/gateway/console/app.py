"""The console's routes: the page at /ui, its static files at /ui/static/, and the JSON, SVG and
live (Server-Sent Events) views of the fleet at /ui/api/.

Every /ui/api route needs an admin key (`Authorization: Bearer`), except on a server without keys,
which listens on loopback only. The page keeps the key in the tab's sessionStorage and sends it as
a header, never as a cookie, so no other site can make the browser act with it. The playground
and loading or unloading adapters are not here: the page calls /v1/chat/completions and
/v1/adapters, the routes every client uses, so those calls are admitted, metered, logged and
audited as any client's are.

Live updates are Server-Sent Events read with `fetch` (EventSource cannot send the key): one
stream per page pushes the new metrics lines of the run on screen, the list of runs when a run
starts, and, when serving, a snapshot of the server's counters every second. Pushed rather than
polled because a run of 100k lines must not be sent again on every tick, and the gateway already
speaks SSE. A stream ends when the server
is asked to stop (`Console.stopping`), so an open tab never holds up a shutdown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.staticfiles import StaticFiles

from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.serve.gateway.console.audit_view import AuditView, EntryFilter
from lorafleet.serve.gateway.console.fleet_view import document, fleet_summary, registry_records
from lorafleet.serve.gateway.console.keys import KeysFile, tenant_rows
from lorafleet.serve.gateway.console.lineage_graph import lineage_graph, render_svg
from lorafleet.serve.gateway.console.runs import RunReader, find_runs
from lorafleet.serve.gateway.console.serving_view import ServingSampler
from lorafleet.serve.gateway.errors import APIError, install_error_handlers
from lorafleet.serve.gateway.state import StateDirectory
from lorafleet.serve.gateway.tenants import Tenant, TenantDirectory

if TYPE_CHECKING:
    from lorafleet.serve.gateway.metrics import Metrics
    from lorafleet.serve.gateway.server import FleetServer

STATIC = Path(__file__).parent / "static"
# Only this origin, for everything: scripts, styles, fonts, images, fetches. Nothing inline.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
LIVE_TICK_S = 1.0
KEEPALIVE_TICKS = 10  # a comment line at least this often, so a closed tab is noticed
RUNS_EVERY_TICKS = 3  # how often the fleet directory is searched for new runs

router = APIRouter(prefix="/ui")


@dataclass
class Serving:
    """What the console sees of a running server."""

    adapters: Callable[[], list[str]]
    base_name: str
    sampler: ServingSampler


@dataclass
class Console:
    fleet_dir: Path
    tenants: Callable[[], TenantDirectory | None]  # read at every call: reloading the keys replaces them
    serving: Serving | None = None  # None under `lorafleet console`, which serves no model
    keys_file: KeysFile | None = None  # set when the server manages its keys file
    audit: Callable[[str, dict], None] | None = None  # records the console's own changes
    stopping: Callable[[], bool] = lambda: False  # set by whoever runs the web server
    runs: dict[str, RunReader] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.audit_view = AuditView(self.fleet_dir)

    def run(self, name: str) -> RunReader:
        if name not in self.runs:
            if name not in find_runs(self.fleet_dir):
                raise APIError(404, f"no run {name!r} in {self.fleet_dir}: the runs are {find_runs(self.fleet_dir)}")
            self.runs[name] = RunReader(self.fleet_dir / name)
        return self.runs[name]


def served_console(server: FleetServer, metrics: Metrics) -> Console:
    """The console of a fleet being served: its counters, its adapters, its keys."""
    options = server.options
    keys_file = None
    # Rewriting the keys file manages nothing on the shared state (its keys live in PostgreSQL:
    # lorafleet keys, /v1/admin/keys), so a replica's console only lists them.
    file_keys = options.state_url is None and options.tenants is not None and options.tenants.source is not None
    if options.manage_keys and file_keys:
        keys_file = KeysFile(options.tenants.source, server.reload_keys)
    serving = Serving(lambda: server.adapters, server.base_name, ServingSampler(metrics.registry))
    # A replica's keys are the shared state's (a key revoked there is refused here too), never optional.
    shared = StateDirectory(server.state) if options.state_url is not None else None
    keys = (lambda: shared) if shared is not None else (lambda: options.tenants)
    return Console(options.fleet_dir, keys, serving, keys_file, server.audit.record)


def mount_console(app: FastAPI, console: Console) -> None:
    app.state.console = console
    app.add_middleware(ConsoleHeaders)
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")


def create_console_app(console: Console) -> FastAPI:
    """The console alone (`lorafleet console`): a fleet's runs, lineage and audit log, no model."""
    app = FastAPI(title="lorafleet console", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    mount_console(app, console)

    @app.get("/")
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    return app


def console_of(request: Request) -> Console:
    return request.app.state.console


def admin(request: Request) -> Tenant | None:
    """The admin calling (None on a server without keys); 401 without a valid key, 403 for a key
    that is not an admin's."""
    tenants = console_of(request).tenants()
    if tenants is None:
        return None
    header = request.headers.get("authorization", "")
    tenant = tenants.authenticate(header[7:].strip() if header.lower().startswith("bearer ") else None)
    if tenant is None:
        raise APIError(401, "Incorrect or missing API key.", "invalid_api_key")
    if not tenant.admin:
        raise APIError(403, f"The console needs an admin key; {tenant.name}'s key is not one.", "permission_denied")
    return tenant


def who(tenant: Tenant | None) -> dict:
    return {"tenant": tenant.name if tenant else None, "key_id": tenant.key_id if tenant else None}


# --- the page --------------------------------------------------------------------------------


@router.get("")
@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/session")
def session(request: Request) -> dict:
    console = console_of(request)
    tenant = admin(request)
    return {
        "fleet": str(console.fleet_dir),
        "fleet_name": console.fleet_dir.resolve().name,
        "tenant": tenant.name if tenant else None,
        "keys": console.tenants() is not None,
        "serving": console.serving is not None,
        "base": console.serving.base_name if console.serving else None,
        "manages_keys": console.keys_file is not None,
    }


# --- fleet -----------------------------------------------------------------------------------


@router.get("/api/fleet")
def fleet(request: Request) -> dict:
    console = console_of(request)
    admin(request)
    return fleet_summary(console.fleet_dir, console.serving.adapters() if console.serving else None)


@router.get("/api/lineage.svg")
def lineage(request: Request) -> Response:
    admin(request)
    nodes, edges = lineage_graph(registry_records(console_of(request).fleet_dir))
    return Response(render_svg(nodes, edges), media_type="image/svg+xml")


@router.get("/api/documents/{name}/{kind}")
def documents(request: Request, name: str, kind: str) -> PlainTextResponse:
    admin(request)
    if kind not in ("card", "annex"):
        raise APIError(404, f"no document {kind!r}: ask for card (the model card) or annex (the Annex IV draft)")
    try:
        text = document(console_of(request).fleet_dir, name, kind)
    except LorafleetError as err:
        raise APIError(404, str(err), "not_found") from err
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")


# --- runs ------------------------------------------------------------------------------------


@router.get("/api/runs")
def runs(request: Request) -> dict:
    admin(request)
    return {"runs": find_runs(console_of(request).fleet_dir)}


@router.get("/api/runs/overview")
def run_overview(request: Request, run: str = ".") -> dict:
    admin(request)
    return console_of(request).run(run).overview()


@router.get("/api/live")
async def live(request: Request, run: str = "", generation: int = 0, counts: str = "{}") -> StreamingResponse:
    """Server-Sent Events: `run` (the lines appended to `run` since the client's `counts` points
    per adapter), `runs` (the fleet's runs, when one appeared or went) and `serving` (the
    counters), each when there is something to say."""
    console = console_of(request)
    admin(request)
    reader = console.run(run) if run else None
    try:
        seen = {str(name): int(count) for name, count in json.loads(counts).items()}
    except (ValueError, AttributeError) as err:
        raise APIError(400, "counts must be a JSON object of adapter name to points seen", "invalid_request") from err
    return StreamingResponse(_live_events(console, reader, generation, seen), media_type="text/event-stream")


async def _live_events(
    console: Console, reader: RunReader | None, generation: int, seen: dict[str, int]
) -> AsyncIterator[str]:
    quiet, ticks, runs = 0, 0, None
    while not console.stopping():
        said = False
        if ticks % RUNS_EVERY_TICKS == 0:  # a run started since the page opened appears in its list
            found = await asyncio.to_thread(find_runs, console.fleet_dir)
            if runs is not None and found != runs:
                yield _event("runs", {"runs": found})
                said = True
            runs = found
        if reader is not None:
            added = await asyncio.to_thread(reader.update, seen, generation)
            if added is not None:
                for name, columns in added.get("adapters", {}).items():
                    seen[name] = seen.get(name, 0) + len(columns["step"])
                yield _event("run", added)
                said = True
                if added.get("reset"):
                    return
        if console.serving is not None:
            yield _event("serving", console.serving.sampler.sample())
            said = True
        quiet = 0 if said else quiet + 1
        if quiet >= KEEPALIVE_TICKS:
            yield ": keepalive\n\n"
            quiet = 0
        ticks += 1
        await asyncio.sleep(LIVE_TICK_S)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# --- serving ---------------------------------------------------------------------------------


@router.get("/api/serving")
def serving(request: Request) -> dict:
    console = console_of(request)
    admin(request)
    if console.serving is None:
        return {"serving": False}
    return {"serving": True, "adapters": console.serving.adapters()} | console.serving.sampler.sample()


# --- tenants and keys ------------------------------------------------------------------------


class NewTenant(BaseModel):
    name: str
    adapters: list[str] | str = "*"
    admin: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@router.get("/api/tenants")
def tenants(request: Request) -> dict:
    console = console_of(request)
    admin(request)
    return {"tenants": tenant_rows(console.tenants()), "manages_keys": console.keys_file is not None}


@router.post("/api/tenants")
def create_tenant(request: Request, body: NewTenant) -> dict:
    keys, by = _keys_file(request)
    key = _changing(
        lambda: keys.create(body.name, body.adapters, body.admin, body.requests_per_minute, body.tokens_per_minute, by)
    )
    _audit(request, "serve.key_created", {"name": body.name, "admin": body.admin} | {"by": by})
    return {"name": body.name, "key": key}


@router.post("/api/tenants/{name}/revoke")
def revoke_key(request: Request, name: str) -> dict:
    keys, by = _keys_file(request)
    key_id = _changing(lambda: keys.revoke(name, by))
    _audit(request, "serve.key_revoked", {"name": name, "revoked_key_id": key_id} | {"by": by})
    return {"name": name, "revoked": True}


@router.post("/api/tenants/{name}/rotate")
def rotate_key(request: Request, name: str) -> dict:
    keys, by = _keys_file(request)
    key = _changing(lambda: keys.rotate(name, by))
    _audit(request, "serve.key_rotated", {"name": name} | {"by": by})
    return {"name": name, "key": key}


def _keys_file(request: Request) -> tuple[KeysFile, dict]:
    console = console_of(request)
    by = who(admin(request))
    if console.keys_file is None:
        raise APIError(
            409,
            "this server does not manage its keys: start it with --keys FILE --manage-keys, or edit the keys file "
            "and reload it (kill -HUP, or POST /v1/keys/reload)",
            "keys_not_managed",
        )
    return console.keys_file, by


def _changing(change: Callable[[], str]) -> str:
    try:
        return change()
    except ConfigError as err:
        raise APIError(400, str(err), "keys_change_refused") from err


def _audit(request: Request, event: str, data: dict) -> None:
    record = console_of(request).audit
    if record is not None:
        record(event, data)


# --- audit -----------------------------------------------------------------------------------


@router.get("/api/audit")
def audit(request: Request, tenant: str = "", adapter: str = "", event: str = "", limit: int = 100) -> dict:
    view = console_of(request).audit_view
    admin(request)
    selection = EntryFilter(tenant, adapter, event)
    return {"verification": view.verification(), "entries": view.entries(selection, limit)}


@router.get("/api/audit/export")
def audit_export(
    request: Request, tenant: str = "", adapter: str = "", event: str = "", format: str = "jsonl"
) -> Response:
    view = console_of(request).audit_view
    admin(request)
    if format not in ("jsonl", "cef", "syslog"):
        raise APIError(400, f"format {format!r}: choose jsonl, cef or syslog", "invalid_request", "format")
    body = "".join(line + "\n" for line in view.export(EntryFilter(tenant, adapter, event), format))
    name = f"audit-{format}.{'jsonl' if format == 'jsonl' else 'log'}"
    attachment = {"Content-Disposition": f"attachment; filename={name}"}
    return Response(body, media_type="text/plain; charset=utf-8", headers=attachment)


# --- headers ---------------------------------------------------------------------------------


class ConsoleHeaders:
    """The console's responses: its Content-Security-Policy, no sniffing, no referrer, no framing;
    its data never cached."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            return await self.app(scope, receive, send)
        data = scope["path"].startswith("/ui/api")

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                headers += [(b"cache-control", b"no-store")] if data else []
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
