"""The graph in other tools' formats: GraphML (yEd, Gephi), DOT (Graphviz), node-link JSON.

Every name in the graph is attacker-chosen text: DOT output escapes quotes, backslashes and
anything outside printable ASCII, so a name cannot end a string or inject attributes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import networkx as nx

from depdrill.artifact import to_json
from depdrill.discover.model import (
    AddressNode,
    EndpointNode,
    Graph,
    NameNode,
    Node,
    ResolverNode,
    ServiceNode,
)

Format = Literal["graphml", "dot", "json"]
FORMATS: tuple[Format, ...] = ("graphml", "dot", "json")


def export(graph: Graph, fmt: Format) -> str:
    if fmt == "json":
        return to_json(graph)
    if fmt == "graphml":
        return _graphml(graph)
    return _dot(graph)


def _scalar(value: Any) -> str | int | float | bool:
    """GraphML holds scalars only: lists and mappings go in as JSON text."""
    if isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _graphml(graph: Graph) -> str:
    flat: nx.DiGraph[str] = nx.DiGraph()
    for node_id, attrs in graph.to_networkx().nodes(data=True):
        flat.add_node(node_id, **{k: _scalar(v) for k, v in attrs.items() if v is not None})
    for source, target, attrs in graph.to_networkx().edges(data=True):
        flat.add_edge(source, target, **{k: _scalar(v) for k, v in attrs.items() if v is not None})
    return "\n".join(nx.generate_graphml(flat)) + "\n"


def _label(node: Node) -> str:
    if isinstance(node, ServiceNode):
        return node.label
    if isinstance(node, ResolverNode):
        return f"resolver {node.address}:{node.port} ({node.transport})"
    if isinstance(node, NameNode):
        return node.name
    if isinstance(node, AddressNode):
        return node.address
    assert isinstance(node, EndpointNode)
    return f"{node.address}:{node.port}/{node.proto}"


_SHAPES = {
    "service": "doubleoctagon",
    "resolver": "cylinder",
    "name": "ellipse",
    "address": "plaintext",
    "endpoint": "box",
}


def _quote(text: str) -> str:
    """A DOT string literal that holds any text: quote and backslash escaped, the rest as
    \\\\uXXXX-like visible escapes so no control character reaches the file."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append(f"\\\\x{ord(char):02x}")
    return '"' + "".join(out) + '"'


def _dot(graph: Graph) -> str:
    lines = ["digraph depdrill {", "  rankdir=LR;"]
    for node in graph.nodes:
        lines.append(
            f"  {_quote(node.id)} [label={_quote(_label(node))}, shape={_SHAPES[node.kind]}];"
        )
    for edge in graph.links:
        lines.append(
            f"  {_quote(edge.source)} -> {_quote(edge.target)} [label={_quote(edge.kind)}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
