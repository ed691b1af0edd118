"""lorafleet: one frozen open model, a fleet of LoRA adapters trained, compressed and served together."""

from __future__ import annotations

__version__ = "0.1.0"
