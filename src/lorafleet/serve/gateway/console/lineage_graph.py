"""The lineage graph as SVG drawn on the server: base → adapters → compressed models, with
`init_from` and every other parent link of the registry.

Drawn here rather than in the browser because the graph is small and changes only when the
registry does, so the page needs no graph library; the SVG uses presentation attributes only (no
`style`), which the console's Content-Security-Policy (its own origin, nothing inline) allows.
Nodes and edges carry `data-` attributes naming what they are, for tests and for the page's links.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from lorafleet.governance.lineage import Lineage

COLUMN, ROW, NODE_W, NODE_H, MARGIN = 230, 56, 180, 36, 16
LANE = 22  # above the top row: where an edge that skips a column runs, so it crosses no node
FILL = {"base": "#e8eef8", "adapter": "#e9f5ea", "model": "#fdf1e1", "external": "#f1f1f1"}


@dataclass
class Node:
    key: str
    name: str
    kind: str  # base | adapter | model | external
    column: int = 0
    row: int = 0


@dataclass(frozen=True)
class Edge:
    parent: str
    child: str
    relation: str


def lineage_graph(records: list[Lineage]) -> tuple[dict[str, Node], list[Edge]]:
    """Nodes by key and the edges between them; a record's key is its registry id, a base's or
    an unregistered parent's is its path."""
    nodes = {lineage.id: Node(lineage.id, lineage.name, lineage.kind) for lineage in records}
    by_directory = {str(Path(lineage.directory)): lineage.id for lineage in records}
    edges: set[Edge] = set()
    for lineage in records:
        base_path = lineage.base.get("path")
        has_base_link = any(parent["relation"] in ("compressed_from", "base") for parent in lineage.parents)
        if base_path and not has_base_link:
            edges.add(Edge(_outside(nodes, by_directory, base_path, "base"), lineage.id, "base"))
        for parent in lineage.parents:
            key = parent.get("id") if parent.get("id") in nodes else None
            kind = "base" if parent["relation"] == "compressed_from" else "external"
            key = key or _outside(nodes, by_directory, parent["path"], kind, parent.get("name"))
            edges.add(Edge(key, lineage.id, parent["relation"]))
    _layout(nodes, edges)
    return nodes, sorted(edges, key=lambda edge: (edge.parent, edge.child, edge.relation))


def _outside(
    nodes: dict[str, Node], by_directory: dict[str, str], path: str, kind: str, name: str | None = None
) -> str:
    """The node of a parent named by path: a registered record in that directory, else a node of its own."""
    if str(Path(path)) in by_directory:
        return by_directory[str(Path(path))]
    key = f"path:{Path(path)}"
    if key not in nodes:
        nodes[key] = Node(key, name or Path(path).name, kind)
    elif kind == "base":
        nodes[key].kind = "base"
    return key


def _layout(nodes: dict[str, Node], edges: set[Edge]) -> None:
    """Columns by the longest chain of parents above a node; rows in name order within a column."""
    parents: dict[str, set[str]] = {key: set() for key in nodes}
    for edge in edges:
        parents[edge.child].add(edge.parent)
    depth: dict[str, int] = {}

    def column(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key not in depth:
            above = [column(parent, seen | {key}) for parent in parents[key] if parent not in seen]
            depth[key] = 1 + max(above) if above else 0
        return depth[key]

    rows: dict[int, int] = {}
    for node in sorted(nodes.values(), key=lambda node: (column(node.key), node.kind != "base", node.name)):
        node.column, node.row = column(node.key), rows.get(column(node.key), 0)
        rows[node.column] = node.row + 1


def render_svg(nodes: dict[str, Node], edges: list[Edge]) -> str:
    if not nodes:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="300" height="40">'
            '<text x="8" y="24">no registry records yet</text></svg>'
        )
    width = MARGIN * 2 + max(node.column for node in nodes.values()) * COLUMN + NODE_W
    height = MARGIN * 2 + LANE + max(node.row for node in nodes.values()) * ROW + NODE_H
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">',
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="8" markerHeight="8" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#667"/></marker></defs>',
    ]
    parts += [_edge_svg(edge, nodes) for edge in edges]
    parts += [_node_svg(node) for node in nodes.values()]
    parts.append("</svg>")
    return "".join(parts)


def _position(node: Node) -> tuple[int, int]:
    return MARGIN + node.column * COLUMN, MARGIN + LANE + node.row * ROW


def _edge_svg(edge: Edge, nodes: dict[str, Node]) -> str:
    parent_node, child_node = nodes[edge.parent], nodes[edge.child]
    (x1, y1), (x2, y2) = _position(parent_node), _position(child_node)
    x1, y1, x2, y2 = x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2
    if child_node.column - parent_node.column > 1:  # over the columns between, along the lane
        lane = MARGIN + LANE // 2
        path = f"M{x1},{y1} C{x1 + 20},{y1} {x1 + 4},{lane} {x1 + 24},{lane} L{x2 - 24},{lane} "
        path += f"C{x2 - 4},{lane} {x2 - 20},{y2} {x2},{y2}"
        label_x, label_y = (x1 + x2) // 2, lane - 3
    else:
        bend = (x2 - x1) // 2
        path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        label_x, label_y = (x1 + x2) // 2, (y1 + y2) // 2 - 4
    parent, child, relation = escape(parent_node.name), escape(child_node.name), escape(edge.relation)
    return (
        f'<g class="edge" data-parent="{parent}" data-child="{child}" data-relation="{relation}">'
        f'<path d="{path}" fill="none" stroke="#889" stroke-width="1.4" marker-end="url(#arrow)"/>'
        f'<text x="{label_x}" y="{label_y}" font-size="10" fill="#556" text-anchor="middle">{relation}</text></g>'
    )


def _node_svg(node: Node) -> str:
    x, y = _position(node)
    name = node.name if len(node.name) <= 24 else node.name[:23] + "…"
    return (
        f'<g class="node" data-name="{escape(node.name)}" data-kind="{node.kind}">'
        f"<title>{escape(node.kind)}: {escape(node.name)}</title>"
        f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{FILL[node.kind]}" stroke="#99a"/>'
        f'<text x="{x + 10}" y="{y + 15}" font-size="12" fill="#222">{escape(name)}</text>'
        f'<text x="{x + 10}" y="{y + 29}" font-size="10" fill="#667">{node.kind}</text></g>'
    )
