"""The fleet directory's layout is written down in one module (fleet_dir.py): no other module joins
a path with a name of the layout, and only the CLI reaches into the gateway (evaluation finds a
fleet's base and adapters through the layout, not through the server)."""

from __future__ import annotations

import ast

from lorafleet import fleet_dir
from tests.test_layers import PACKAGE, graph

LAYOUT_NAMES = {
    fleet_dir.BASE,
    fleet_dir.ADAPTERS,
    fleet_dir.CHECKPOINTS,
    fleet_dir.METRICS,
    fleet_dir.TENSORBOARD,
    fleet_dir.REPORT,
    fleet_dir.DATABASE,
    fleet_dir.AUDIT,
    fleet_dir.ERASURES,
    fleet_dir.REPLICAS,
}


def layout_joins(source: str) -> list[int]:
    """Lines where a path is joined (`/`) with one of the layout's names written out."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in LAYOUT_NAMES:
                    lines.append(node.lineno)
    return sorted(lines)


def test_only_fleet_dir_joins_paths_with_the_layouts_names():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "fleet_dir.py" and path.parent == PACKAGE:
            continue
        found += [f"{path.relative_to(PACKAGE)}:{line}" for line in layout_joins(path.read_text())]
    assert not found, "use lorafleet.fleet_dir.FleetDir instead of writing the layout out:\n" + "\n".join(found)


def test_the_check_sees_a_layout_name_written_out():
    assert layout_joins('out / "adapters" / name\nPath(x) / "metrics.jsonl"\nx / "data"') == [1, 2]


def test_only_the_cli_imports_the_gateway_from_outside_serve():
    reaching_in = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if target.startswith("lorafleet.serve.gateway") and not module.startswith(("lorafleet.serve", "lorafleet.cli"))
    )
    assert not reaching_in, "\n".join(reaching_in)


def test_checkpoints_are_listed_oldest_first_and_other_files_left_out(tmp_path):
    fleet = fleet_dir.FleetDir(tmp_path)
    fleet.checkpoints.mkdir()
    for step in (12, 3, 100):
        fleet.checkpoint(step).write_bytes(b"")
    (fleet.checkpoints / "step-00000007.pt.partial").write_bytes(b"")
    (fleet.checkpoints / "notes.txt").write_text("")
    assert [p.name for p in fleet.checkpoint_files()] == ["step-00000003.pt", "step-00000012.pt", "step-00000100.pt"]
    assert [fleet_dir.checkpoint_step(p) for p in fleet.checkpoint_files()] == [3, 12, 100]
    assert fleet_dir.FleetDir(tmp_path / "none").checkpoint_files() == []
