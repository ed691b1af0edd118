"""A fleet being served: its backend (our engine, or vLLM upstream), tenants and request log.

`lorafleet serve --fleet DIR` reads DIR as `lorafleet demo` or `lorafleet train` leave it:
`adapters/<name>/` PEFT directories, and the base in `base/` or, failing that, the base path the
adapters were trained on (`base_model_name_or_path`). A plain model directory (`lorafleet
compress` output, any HF checkpoint) is served as a base without adapters. Weights the fleet's
registry has withdrawn (`lorafleet data forget`) are refused, at start and at runtime loading,
unless `serve_withdrawn` is set.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lorafleet.config import read_yaml
from lorafleet.errors import AdapterError, ConfigError
from lorafleet.fleet_dir import DATABASE, FleetDir, find_base_dir, fleet_adapters
from lorafleet.governance.export import Cursor, shipping_cursor
from lorafleet.governance.registry import withdrawn_weights
from lorafleet.governance.shipping import Shipper, open_destination
from lorafleet.governance.signing import load_private_key
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.grammar import GrammarLimits
from lorafleet.serve.engine.streams import EventSource
from lorafleet.serve.gateway.audit_trail import SIGN_EVERY_SECONDS, AuditTrail, adapter_id
from lorafleet.serve.gateway.calls import PreparedRequest
from lorafleet.serve.gateway.embedded_state import EmbeddedState
from lorafleet.serve.gateway.images import ImagePolicy
from lorafleet.serve.gateway.local import LocalBackend
from lorafleet.serve.gateway.protocol import ChatCompletionRequest, RequestLimits, TextCompletionRequest
from lorafleet.serve.gateway.request_log import RequestLog
from lorafleet.serve.gateway.state import Prices, ServingState, StateUnavailable
from lorafleet.serve.gateway.tenants import TenantDirectory
from lorafleet.serve.gateway.tools import ToolUse
from lorafleet.serve.gateway.upstream import UpstreamBackend, start_vllm

BASE_ALIAS = "base"


class Backend(Protocol):
    """What generates for the gateway: lorafleet's engine in this process (`LocalBackend`) or an
    OpenAI-compatible server such as vLLM (`UpstreamBackend`)."""

    @property
    def adapters(self) -> list[str]: ...

    @property
    def running(self) -> int: ...  # requests being generated now

    def waiting(self) -> int: ...  # requests submitted and not yet generating (the engine's queue)

    def start(self) -> None: ...

    def close(self) -> None: ...

    async def ready_problem(self) -> str | None: ...  # None when a real generation succeeds

    def alive(self) -> bool: ...  # whether it is serving, judged without generating anything

    def load_adapter(self, name: str, path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...  # KeyError when it is not loaded

    # A completion in two phases, so that the gateway admits a request (the tenant's token limit)
    # between them, knowing what it can use, before the engine sees it.
    async def prepare_chat(
        self, body: ChatCompletionRequest, adapter: str | None, tools: ToolUse | None, tenant: str = ""
    ) -> PreparedRequest:
        """The chat rendered, counted and checked (APIError when it cannot run), its grammar
        compiled for `tenant` (the name its compiled grammars are cached under); nothing generates yet."""
        ...

    async def prepare_completion(self, body: TextCompletionRequest, adapter: str | None) -> PreparedRequest:
        """The same for a text completion and its prompts."""
        ...

    async def submit(
        self, request: PreparedRequest, tenant: str | None = None, max_rows: int | None = None
    ) -> list[EventSource]:
        """Start generating `request.choices` replies to each prompt, in OpenAI's order: each one's
        text as events, the last one with the finish reason and token counts. `tenant` names whose
        request it is and `max_rows` caps that tenant's rows (its own cap; None: the server's),
        for a backend that shares its batch fairly between tenants."""
        ...


@dataclass
class ServeOptions:
    fleet_dir: Path
    base_dir: Path | None = None
    tenants: TenantDirectory | None = None  # None: no keys, loopback only
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    log_content: bool = False  # prompts and replies in the audit log, personal data replaced
    max_batch: int = 32
    # Rows of the batch one tenant's requests hold at once; default: half of max_batch with keys
    # (another tenant always finds rows free), all of it without (one caller: nobody to share with).
    max_tenant_rows: int | None = None
    max_seq_len: int = 4096  # tokens per request (prompt and reply): the KV cache's capacity per row
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # per request
    max_tiles: int | None = None  # image tiles for every model; default: each adapter's training setting
    max_body_bytes: int = 32 * 2**20  # a request body over this gets 413 before it is parsed
    max_tenant_requests: int = 32  # one tenant's requests in flight at once (the rest wait their turn) ...
    max_tenant_waiting: int = 128  # ... and waiting for it, past which the tenant gets a 429
    # Threads that fetch and decode images and tokenise prompts, off the event loop; with keys one
    # tenant's requests hold at most half of them.
    prepare_threads: int = 8
    limits: RequestLimits = field(default_factory=RequestLimits)  # prompts, choices, stops, tools, JSON depth
    public_metrics: bool = False  # with keys, /metrics needs one unless this is set
    device: str | None = None
    dtype: torch.dtype | None = None
    engine: str = "local"  # local | vllm
    upstream_url: str | None = None  # attach to a running vLLM (or any OpenAI-compatible server)
    vllm_port: int = 8100
    vllm_args: list[str] = field(default_factory=list)  # passed to `vllm serve` after ours
    vllm_gpu_slots: int | None = None  # vLLM's --max-loras; default: the fleet's size, at most 8
    vllm_python: Path | None = None  # the Python of vLLM's own environment; default: `vllm` on PATH, or ours
    audit_key: Path | None = None  # Ed25519 private key: the server signs checkpoints of its audit log
    audit_sign_every_s: float = SIGN_EVERY_SECONDS
    serve_withdrawn: bool = False  # load adapters the registry has withdrawn (erasure) all the same
    audit_ship_to: str | None = None  # syslog(+tcp)://HOST:PORT or an OTLP/HTTP logs URL
    audit_ship_queue: int = 10_000  # entries waiting to be shipped at most; more are counted, shipped later
    # structured output: schema caps, the compile sandbox's limits, the mask budget (docs/security.md)
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)
    manage_keys: bool = False  # the console may create, revoke and rotate keys by rewriting the keys file
    # The shared serving state of replicas (both, or neither): keys, tenants, usage and the request
    # log in PostgreSQL, the windows in Redis. Without them, the embedded state (state.py).
    state_url: str | None = None  # postgresql://…
    redis_url: str | None = None  # redis://…
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    state_unavailable: str = "closed"  # Redis out of reach: refuse (503), or "open": limits per replica
    prices: Prices = field(default_factory=Prices)  # per million tokens: usage's cost, monthly cost budgets

    @property
    def keyed(self) -> bool:
        """Callers need a key: a keys file, or the shared state of replicas (whose keys are never optional)."""
        return self.tenants is not None or self.state_url is not None


def not_a_fleet_directory(path: Path) -> str:
    """Why `path` cannot be served as a fleet, and what to pass instead. The usual mistake is the
    fleet YAML itself: --fleet takes what training wrote (the YAML's `output:` directory)."""
    if not path.exists():
        return (
            f"fleet directory {path} does not exist; --fleet takes the directory `lorafleet train` wrote "
            "(the fleet YAML's output:) or `lorafleet demo` made (demo-out)"
        )
    if not path.is_file():
        return f"--fleet {path} is not a directory"
    hint = ""
    try:
        spec = read_yaml(path, "fleet spec")
    except ConfigError:
        spec = None
    if isinstance(spec, dict) and isinstance(spec.get("output"), str):
        output = Path(spec["output"]).expanduser()
        hint = f": serve this one's with --fleet {output if output.is_absolute() else path.parent / output}"
    return (
        f"--fleet {path} is a file, not a directory. --fleet takes the directory `lorafleet train` wrote "
        f"(the fleet YAML's output:, holding adapters/){hint}"
    )


def audit_shipper(fleet_dir: Path, target: str | None, queue_size: int) -> Shipper | None:
    """Ships the audit log to `target` from where the last server left off (a cursor per target)."""
    if target is None:
        return None
    return Shipper(fleet_dir, open_destination(target), Cursor.load(shipping_cursor(fleet_dir, target)), queue_size)


class FleetServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        if not options.fleet_dir.is_dir():
            raise ConfigError(not_a_fleet_directory(options.fleet_dir))
        signer = load_private_key(options.audit_key) if options.audit_key else None  # a bad key fails before loading
        if (options.state_url is None) != (options.redis_url is None):
            raise ConfigError(
                "replicas share their state in PostgreSQL and Redis: give both --state postgresql://… and "
                "--redis redis://…, or neither (one process, the embedded state)"
            )
        if options.state_url is not None:
            FleetDir(options.fleet_dir).replica(options.replica_id)  # a bad replica id fails before loading
        self._admin_lock = threading.Lock()
        self.adapter_ids: dict[str, str | None] = {}  # name -> registry id of the weights being served
        self.backend = self._backend()
        self.request_log: RequestLog | None = None  # the embedded state's; the shared state logs to PostgreSQL
        self.state = self._state()
        # A replica of the shared state keeps its own chain (audit_trail.py says why), named by its id.
        replica = options.replica_id if options.state_url is not None else None
        audit_home = FleetDir(options.fleet_dir).replica(replica) if replica is not None else options.fleet_dir
        shipper = audit_shipper(audit_home, options.audit_ship_to, options.audit_ship_queue)
        self.audit = AuditTrail(
            audit_home, options.log_content, signer, options.audit_sign_every_s, shipper, replica=replica
        )

    def _backend(self) -> Backend:
        options = self.options
        if options.upstream_url:
            backend = UpstreamBackend(options.upstream_url)
            self.base_name = backend.base_model
            self._check_tenants(options.tenants, backend.adapters)
            return backend
        base_dir = options.base_dir or find_base_dir(options.fleet_dir)
        self.base_name = base_dir.name
        adapters = fleet_adapters(options.fleet_dir)
        self._check_tenants(options.tenants, adapters)  # before a base that may take minutes to load
        ids = {name: self._allowed_id(name, path) for name, path in adapters.items()}
        if options.engine == "vllm":
            self.adapter_ids = ids
            return start_vllm(
                base_dir, adapters, options.vllm_port, options.vllm_args, options.vllm_gpu_slots, options.vllm_python
            )
        backend = LocalBackend(
            load_base(base_dir, options.device, options.dtype),
            options.image_policy,
            options.max_image_pixels,
            options.max_batch,
            options.max_seq_len,
            options.max_images,
            options.max_tiles,
            options.grammar_limits,
            self._rows_per_tenant(),
            options.prepare_threads,
        )
        for name, path in adapters.items():
            backend.load_adapter(name, path)
            self.adapter_ids[name] = ids[name]
        return backend

    def _state(self) -> ServingState:
        options = self.options
        if options.state_url is None:
            self.request_log = RequestLog(options.fleet_dir / DATABASE)
            # a getter: reloading the keys file replaces the directory in force
            return EmbeddedState(lambda: self.options.tenants, self.request_log, options.prices)
        from lorafleet.serve.gateway.shared_state import SharedState  # the drivers load only here

        try:
            state = SharedState(
                options.state_url,
                options.redis_url,
                options.replica_id,
                when_unavailable=options.state_unavailable,
                prices=options.prices,
            )
        except StateUnavailable as err:
            raise ConfigError(f"the shared serving state cannot be reached: {err}") from err
        if options.tenants is not None:
            state.import_keys_file(options.tenants)
        return state

    def _allowed_id(self, name: str, path: Path) -> str | None:
        """The registry id of the adapter in `path`; AdapterError when the fleet's registry has
        withdrawn those weights and the server was not told to serve them anyway."""
        weights = adapter_id(path)
        withdrawn = withdrawn_weights(self.options.fleet_dir).get(weights) if weights else None
        if withdrawn is not None and not self.options.serve_withdrawn:
            raise AdapterError(
                f"{path}: adapter {name!r} ({weights[:12]}) was withdrawn on {withdrawn['time']}: "
                f"{withdrawn['reason']}. Retrain it (lorafleet data forget --retrain) or pass --serve-withdrawn "
                "to serve it anyway"
            )
        return weights

    def _rows_per_tenant(self) -> int | None:
        options = self.options
        if options.max_tenant_rows is not None:
            return options.max_tenant_rows
        return max(1, options.max_batch // 2) if options.keyed else None

    def _check_tenants(self, tenants: TenantDirectory | None, adapters: Iterable[str]) -> None:
        if tenants is not None:
            tenants.check_adapters(set(adapters), self.base_names)

    @property
    def base_names(self) -> set[str]:
        return {BASE_ALIAS, self.base_name}

    @property
    def fingerprint(self) -> str:
        """What the replies' `system_fingerprint` names: the backend and the base it serves."""
        kind = "upstream" if isinstance(self.backend, UpstreamBackend) else "local"
        return f"{kind}-{hashlib.sha256(self.base_name.encode()).hexdigest()[:8]}"

    @property
    def adapters(self) -> list[str]:
        return self.backend.adapters

    def resolve_model(self, name: str) -> str | None:
        """The adapter a model name means (None: the base); KeyError when there is none."""
        if name in self.base_names:
            return None
        if name in self.backend.adapters:
            return name
        raise KeyError(name)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter; a relative path is taken from the fleet directory of whoever generates
        (ours for the local engine, the upstream's for vLLM, which reads its own disk)."""
        if name in self.base_names:
            raise AdapterError(f"{name!r} is the base model's name; choose another adapter name")
        with self._admin_lock:
            weights = self._allowed_id(name, self.options.fleet_dir / path)
            if isinstance(self.backend, UpstreamBackend):
                self.backend.load_adapter(name, path)
            else:
                self.backend.load_adapter(name, self.options.fleet_dir / path)
            self.adapter_ids[name] = weights

    def unload_adapter(self, name: str) -> None:
        with self._admin_lock:
            self.backend.unload_adapter(name)
            self.adapter_ids.pop(name, None)

    def reload_keys(self, by: dict) -> dict:
        """Read the keys file again and use it from the next request; a file that no longer loads,
        whatever is in it, leaves the keys in force unchanged (ConfigError). Both outcomes are
        audited; `by` names who asked (tenant and key id, or the signal)."""
        if self.options.tenants is None:
            raise ConfigError("the server was started without --keys: there is no keys file to reload")
        previous = self.options.tenants
        try:
            fresh = previous.reloaded()
            self._check_tenants(fresh, self.adapters)
            self.state.import_keys_file(fresh)
        except ConfigError as err:
            self._audit_failed_reload(err, previous, by)
            raise
        except Exception as err:  # noqa: BLE001 - whatever the file holds, the server keeps the keys it has
            problem = ConfigError(f"{previous.source}: cannot be read as a keys file ({type(err).__name__}: {err})")
            self._audit_failed_reload(problem, previous, by)
            raise problem from err
        self.options.tenants = fresh
        described = self.options.tenants.describe()
        self.audit.record("serve.keys_reloaded", described | {"previous_sha256": previous.source_sha256} | by)
        return described

    def _audit_failed_reload(self, problem: ConfigError, kept: TenantDirectory, by: dict) -> None:
        self.audit.record("serve.keys_reload_failed", {"error": str(problem), "kept_sha256": kept.source_sha256} | by)

    def start(self) -> FleetServer:
        self.backend.start()
        # Everything loaded so far (the model, tokenizer, libraries: some 300,000 objects with the
        # libraries alone) lives as long as the server: out of the collector's sight, a full
        # collection no longer walks it, which took 0.3 s and stalled every tenant's requests
        # (vLLM and SGLang freeze their heaps after start-up the same way).
        gc.collect()
        gc.freeze()
        tenants = self.options.tenants
        self.audit.record(
            "serve.start",
            {
                "fleet": str(self.options.fleet_dir.resolve()),
                "base": self.base_name,
                "backend": self.fingerprint,
                "upstream": self.options.upstream_url,
                "adapters": dict(self.adapter_ids),
                "keys": tenants.describe() if tenants is not None else None,
                "log_content": self.options.log_content,
                "audit_signed_every_s": self.options.audit_sign_every_s if self.options.audit_key else None,
            },
        )
        return self

    def close(self) -> None:
        self.audit.record("serve.stop", {"fleet": str(self.options.fleet_dir.resolve())})
        try:
            self.backend.close()
            self.state.close()
        finally:
            self.audit.close()
