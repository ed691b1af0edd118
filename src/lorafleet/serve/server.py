"""A fleet being served: the base, its loaded adapters, the engine, tenants, the request log.

`lorafleet serve --fleet DIR` reads DIR as `lorafleet demo` or `lorafleet train` leave it:
`adapters/<name>/` PEFT directories, and the base in `base/` or, failing that, the base path the
adapters were trained on (`base_model_name_or_path`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.adapters.peft_io import load_adapter
from lorafleet.errors import AdapterError, ConfigError
from lorafleet.models.loading import load_base
from lorafleet.serve.engine import Engine
from lorafleet.serve.images import ImagePolicy
from lorafleet.serve.request_log import RequestLog
from lorafleet.serve.tenants import TenantDirectory

BASE_ALIAS = "base"


@dataclass
class ServeOptions:
    fleet_dir: Path
    base_dir: Path | None = None
    tenants: TenantDirectory | None = None  # None: no keys, loopback only
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    log_content: bool = False
    max_batch: int = 32
    max_image_pixels: int = 4096 * 4096
    device: str | None = None
    dtype: torch.dtype | None = None


def find_base_dir(fleet_dir: Path) -> Path:
    if (fleet_dir / "base" / "config.json").exists():
        return fleet_dir / "base"
    for config in sorted((fleet_dir / "adapters").glob("*/adapter_config.json")):
        recorded = json.loads(config.read_text()).get("base_model_name_or_path")
        if recorded and Path(recorded).exists():
            return Path(recorded)
    raise ConfigError(
        f"{fleet_dir}: no base/ directory and no adapter that names an existing base model; pass --base DIR"
    )


class FleetServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        fleet_dir = options.fleet_dir
        if not fleet_dir.is_dir():
            raise ConfigError(f"fleet directory {fleet_dir} does not exist")
        base_dir = options.base_dir or find_base_dir(fleet_dir)
        self.base_dir = base_dir
        self.base = load_base(base_dir, options.device, options.dtype)
        self.base_names = {BASE_ALIAS, base_dir.name}
        self.fleet = LoRAFleet(self.base.model, self.base.language_prefix)
        self._admin_lock = threading.Lock()
        self.engine = Engine(self.base, self.fleet, max_batch=options.max_batch)
        for adapter_dir in sorted((fleet_dir / "adapters").glob("*/adapter_config.json")):
            self.load_adapter(adapter_dir.parent.name, adapter_dir.parent)
        self.request_log = RequestLog(fleet_dir / "lorafleet.sqlite", log_content=options.log_content)

    @property
    def adapters(self) -> list[str]:
        return sorted(self.fleet.shapes)

    def resolve_model(self, name: str) -> str | None:
        """The adapter a model name means (None: the base); KeyError when there is none."""
        if name in self.base_names:
            return None
        if name in self.fleet.shapes:
            return name
        raise KeyError(name)

    def load_adapter(self, name: str, path: Path) -> None:
        if name in self.base_names:
            raise AdapterError(f"{name!r} is the base model's name; choose another adapter name")
        with self._admin_lock, self.engine.model_lock:
            if name in self.fleet.shapes:
                raise AdapterError(f"adapter {name!r} is already loaded")
            load_adapter(self.fleet, name, path)

    def unload_adapter(self, name: str) -> None:
        with self._admin_lock, self.engine.model_lock:
            if name not in self.fleet.shapes:
                raise KeyError(name)
            if name in self.engine.adapters_in_use():
                raise AdapterError(f"adapter {name!r} has requests in flight; retry when they finish")
            self.fleet.remove_adapter(name)

    def start(self) -> FleetServer:
        self.engine.start()
        return self

    def close(self) -> None:
        self.engine.stop()
        self.request_log.close()
