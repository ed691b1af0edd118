"""The import graph points down: a lower layer never imports a higher one, rooms on one floor
never import each other, and no module imports itself round a cycle (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import lorafleet

PACKAGE = Path(lorafleet.__file__).parent

# Floor of each top-level room, bottom up; rooms on one floor stand side by side.
FLOORS = {
    "errors": 0,
    "segments": 1, "state": 1, "config": 1, "cost": 1,
    "fleet_dir": 2,  # the fleet directory's layout: everything that reads or writes a fleet stands on it
    "models": 3, "governance": 3,
    "data": 4,
    "adapters": 5,
    "train": 6, "serve": 6, "compress": 6,
    "eval": 7, "report": 7, "sweep": 7,
    "demo": 8,  # the whole story: trains, evaluates and writes the report
    "cli": 9,
    "__main__": 10,  # python -m lorafleet: runs the CLI
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every lorafleet module `path` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafleet"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("lorafleet"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path):
            while target and target not in modules:  # `from pkg import name`: name may be a module or not
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorafleet"


def test_every_room_has_a_floor():
    rooms = {room(module) for module in graph()} - {"lorafleet"}
    assert rooms <= set(FLOORS), f"place {sorted(rooms - set(FLOORS))} in FLOORS and docs/architecture.md"


def test_imports_point_down_and_never_across_a_floor():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = room(module), room(target)
            if "lorafleet" in (here, there) or here == there:
                continue
            if FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} (floor {FLOORS[here]}) imports {target} (floor {FLOORS[there]})")
    assert not wrong, "\n".join(sorted(wrong))


# Rooms inside a room, bottom up: the same rule one level down.
INNER_FLOORS = {
    "serve": {"engine": 0, "gateway": 1},
    # the trainer is the step loop on top; scoring (which eval reads) stands below every objective,
    # and `lorafleet plan` asks admission without the trainer
    "train": {
        "loss": 0, "memory": 0, "optimizer": 0, "checkpoint": 0, "run_log": 0, "distributed": 0,
        "scoring": 1,
        "objectives": 2,
        "job": 3, "progress": 3, "provenance": 3,
        "step": 4, "references": 4, "admission": 4,
        "held_out": 5, "parallel": 5, "plan": 5,
        "trainer": 6,
    },
}  # fmt: skip


def test_every_inner_room_has_a_floor():
    missing = set()
    for module in graph():
        outer = room(module)
        if outer in INNER_FLOORS and module.count(".") >= 2 and module.split(".")[2] not in INNER_FLOORS[outer]:
            missing.add(module)
    assert not missing, f"place {sorted(missing)} in INNER_FLOORS and docs/architecture.md"


def test_inner_rooms_point_down_too():
    wrong = []
    for module, targets in graph().items():
        outer = room(module)
        if outer not in INNER_FLOORS:
            continue
        floors = INNER_FLOORS[outer]
        here = module.split(".")[2] if module.count(".") >= 2 else None
        for target in targets:
            there = target.split(".")[2] if room(target) == outer and target.count(".") >= 2 else None
            if here in floors and there in floors and floors[there] > floors[here]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
