"""A real fleet served by a real uvicorn server on 127.0.0.1, for the real openai client.

The web server and the gateway are imported where a server starts, not at the top: the engine's
tests here (test_decode.py runs on the GPU machine, whose image has no uvicorn, fastapi or
llguidance) must be collected without them; tests/test_device_image.py holds that.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import save_adapter
from lorafleet.models.loading import load_base
from lorafleet.serve.gateway.tenants import hash_key, load_tenants

if TYPE_CHECKING:
    from lorafleet.serve.gateway.server import FleetServer, ServeOptions

ADAPTERS = {"finance": (["q_proj", "v_proj", "down_proj"], 4), "legal": (["o_proj", "up_proj"], 8)}
KEYS = {"finance-team": "sk-finance", "legal-team": "sk-legal", "ops": "sk-admin", "tight": "sk-tight"}


@pytest.fixture(scope="session")
def fleet_dir(tmp_path_factory, tiny_vlm_dir) -> Path:
    """demo-style fleet directory: base/ plus two adapters with weights that change the outputs."""
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(tiny_vlm_dir, root / "base")
    base = load_base(root / "base")
    fleet = LoRAFleet(base.model, base.language_prefix)
    for seed, (name, (targets, rank)) in enumerate(ADAPTERS.items()):
        modules = find_target_modules(base.model, base.language_prefix, targets)
        fleet.add_adapter(name, LoRAShape(rank, 2.0 * rank, 0.0, modules), seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for weight in fleet.parameters(name):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
        save_adapter(fleet, name, root / "adapters" / name, root / "base")
    return root


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    tenants = [
        {"name": "finance-team", "key_sha256": hash_key(KEYS["finance-team"]), "adapters": ["finance"]},
        {"name": "legal-team", "key": KEYS["legal-team"], "adapters": ["legal"]},
        {"name": "ops", "key_sha256": hash_key(KEYS["ops"]), "adapters": "*", "admin": True},
        {"name": "tight", "key_sha256": hash_key(KEYS["tight"]), "adapters": "*", "requests_per_minute": 2},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(options: ServeOptions) -> Iterator[tuple[str, FleetServer]]:
    import uvicorn

    from lorafleet.serve.gateway.api import create_app
    from lorafleet.serve.gateway.server import FleetServer

    server = FleetServer(options).start()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        server.close()


@pytest.fixture(scope="module")
def keyed_server(fleet_dir, keys_file) -> Iterator[tuple[str, FleetServer]]:
    from lorafleet.serve.gateway.server import ServeOptions

    with running_server(ServeOptions(fleet_dir=fleet_dir, tenants=load_tenants(keys_file))) as running:
        yield running
