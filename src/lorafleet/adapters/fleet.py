"""Model surgery: wrap a base model's Linear layers so it carries a fleet of LoRA adapters.

`LoRAFleet` finds the target Linear layers (below the language model only, so a VLM's vision tower
is never adapted by accident), wraps each in a `MultiLoRALinear` on first use, and routes a batch's
rows to adapters with `with fleet.route(segments): model(...)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorafleet.adapters.initial import FROM_THE_BASE
from lorafleet.adapters.layer import MultiLoRALinear, Routing
from lorafleet.errors import AdapterError
from lorafleet.models.quantized import QuantizedLinear
from lorafleet.segments import Segment


@dataclass(frozen=True)
class LoRAShape:
    """What an adapter is, independent of its weights."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]  # full module names in the base model, e.g. model.layers.0.self_attn.q_proj
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    use_dora: bool = False  # DoRA: a trained magnitude vector per module (adapters/dora.py)
    init: str = "kaiming"  # kaiming | gaussian | pissa | olora (adapters/initial.py)

    @property
    def saved_rank(self) -> int:
        """The rank of the PEFT adapter it saves as: PiSSA / OLoRA save as a plain LoRA of twice the rank."""
        return 2 * self.rank if self.init in FROM_THE_BASE else self.rank


def find_target_modules(model: nn.Module, language_prefix: str, target_modules: Sequence[str] | str) -> tuple[str, ...]:
    """Resolve peft-style targets to full module names of Linear layers below `language_prefix`.

    A list names modules by their last components (`q_proj`, `self_attn.o_proj`); a string is a
    regular expression matched against the full name, as in peft. Unknown names are an error.
    """
    linears = [
        name
        for name, module in model.named_modules()
        if name.startswith(language_prefix)
        and isinstance(module, (nn.Linear, MultiLoRALinear, QuantizedLinear))
        and not _inside_lora(name)
    ]
    if isinstance(target_modules, str):
        found = tuple(name for name in linears if re.fullmatch(target_modules, name))
        if not found:
            raise AdapterError(f"target_modules regex {target_modules!r} matches no Linear layer of the language model")
        return found
    found: list[str] = []
    for target in target_modules:
        matches = [name for name in linears if name == target or name.endswith("." + target)]
        if not matches:
            available = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise AdapterError(
                f"target module {target!r} is not a Linear layer of the language model; "
                f"available: {', '.join(available)}"
            )
        found.extend(matches)
    return tuple(sorted(set(found), key=linears.index))


def _inside_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith("base_layer")


class LoRAFleet:
    """A base model with named LoRA adapters that can be trained or served side by side."""

    def __init__(self, model: nn.Module, language_prefix: str = "") -> None:
        self.model = model
        self.language_prefix = language_prefix
        self.routing = Routing()
        self.shapes: dict[str, LoRAShape] = {}

    def add_adapter(self, name: str, shape: LoRAShape, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        """Attach a freshly initialised adapter; A is drawn from `seed` in module order."""
        if name in self.shapes:
            raise AdapterError(f"adapter {name!r} is already loaded")
        generator = torch.Generator().manual_seed(seed)
        self._assign_slot(name)
        for module_name in shape.modules:
            self._wrapped(module_name).add_adapter(
                name,
                shape.rank,
                shape.alpha,
                shape.dropout,
                generator,
                dtype,
                shape.use_rslora,
                shape.use_dora,
                shape.init,
            )
        self.shapes[name] = shape

    def remove_adapter(self, name: str) -> None:
        for module_name in self.shapes.pop(name).modules:
            self._wrapped(module_name).remove_adapter(name)
        del self.routing.slots[name]
        self.routing.slots_version += 1

    def _assign_slot(self, name: str) -> None:
        """The lowest free slot: stacked inference weights stay as small as the live fleet."""
        taken = set(self.routing.slots.values())
        self.routing.slots[name] = next(slot for slot in range(1, len(taken) + 2) if slot not in taken)
        self.routing.slots_version += 1

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of one adapter, in a stable order."""
        return [weight for _, weight in self.named_weights(name)]

    def named_weights(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(module_name.lora_A|lora_B[|lora_magnitude_vector], weight) for every layer the adapter
        touches (the magnitude vector for DoRA adapters)."""
        for module_name in self.shapes[name].modules:
            layer = self._wrapped(module_name)
            yield f"{module_name}.lora_A", layer.lora_A[name].weight
            yield f"{module_name}.lora_B", layer.lora_B[name].weight
            if name in layer.lora_magnitude_vector:
                yield f"{module_name}.lora_magnitude_vector", layer.lora_magnitude_vector[name].weight

    def saved_weights(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """`named_weights` as the adapter saves: for PiSSA / OLoRA the plain LoRA [A; A0], [B, -B0]
        that applies to the unchanged base (adapters/initial.py), else the weights themselves."""
        for module_name in self.shapes[name].modules:
            layer = self._wrapped(module_name)
            weights = layer.adapter_weights()[name]
            yield f"{module_name}.lora_A", weights.lora_A.weight
            yield f"{module_name}.lora_B", weights.lora_B.weight
            if weights.magnitude is not None:
                yield f"{module_name}.lora_magnitude_vector", weights.magnitude

    @contextmanager
    def route(self, segments: Sequence[Segment], by_token: bool = False) -> Iterator[None]:
        """Within the block, rows (or, `by_token`, tokens of a packed batch) of every forward pass
        go to the adapters the segments name."""
        unknown = {s.adapter for s in segments if s.adapter is not None} - set(self.shapes)
        if unknown:
            raise AdapterError(f"adapters {sorted(unknown)} are not loaded")
        previous = self.routing.segments, self.routing.by_token
        self.routing.segments, self.routing.by_token = tuple(segments), by_token
        try:
            yield
        finally:
            self.routing.segments, self.routing.by_token = previous

    @contextmanager
    def use(self, name: str | None, rows: int) -> Iterator[None]:
        """Route all `rows` rows to one adapter (or to the base with None)."""
        with self.route([Segment(name, 0, rows)]):
            yield

    def _wrapped(self, module_name: str) -> MultiLoRALinear:
        parent_name, _, child_name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        child = getattr(parent, child_name)
        if isinstance(child, MultiLoRALinear):
            if child.routing is not self.routing:  # wrapped by an earlier fleet on the same base
                if len(child.lora_A):
                    raise AdapterError(
                        f"{module_name} carries adapters of another fleet ({', '.join(child.lora_A)}); "
                        "one base serves one fleet at a time"
                    )
                child.follow(self.routing)
            return child
        if not isinstance(child, (nn.Linear, QuantizedLinear)):
            raise AdapterError(f"{module_name} is a {type(child).__name__}, not a Linear layer")
        wrapped = MultiLoRALinear(child, self.routing)
        setattr(parent, child_name, wrapped)
        return wrapped
