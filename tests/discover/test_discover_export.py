"""Exports of the graph read back in networkx, and hostile names stay inside DOT strings."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import networkx as nx

from depdrill.discover.export import export
from depdrill.discover.model import (
    SERVICE_ID,
    AddressNode,
    AnswerEdge,
    CaptureStats,
    Graph,
    NameNode,
    ResolvedEdge,
    ServiceNode,
    address_id,
    name_id,
)

HOSTILE = 'evil"];\n x [label="pwn\\\\'


def _graph() -> Graph:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return Graph(
        target="test",
        capture=CaptureStats(started=when, ended=when),
        nodes=[
            ServiceNode(label="svc"),
            NameNode(id=name_id("api.test"), name="api.test"),
            NameNode(id=name_id(HOSTILE), name=HOSTILE),
            AddressNode(id=address_id("198.19.1.2"), address="198.19.1.2", family=4),
        ],
        links=[
            ResolvedEdge(source=SERVICE_ID, target=name_id("api.test"), qtypes=["A"],
                         rcodes={"NOERROR": 2}, count=2, first_seen=when),
            ResolvedEdge(source=SERVICE_ID, target=name_id(HOSTILE), count=1),
            AnswerEdge(source=name_id("api.test"), target=address_id("198.19.1.2"), rtype="A"),
        ],
    )  # fmt: skip


def test_graphml_reads_back_with_the_same_nodes_edges_and_attributes() -> None:
    # Given a graph, When exported to GraphML and read by networkx
    back = nx.parse_graphml(export(_graph(), "graphml"))
    # Then nodes, edges and their attributes survive (lists and mappings as JSON text)
    assert set(back.nodes) == {n.id for n in _graph().nodes}
    assert back.nodes[name_id(HOSTILE)]["name"] == HOSTILE
    edge = back.edges[SERVICE_ID, name_id("api.test")]
    assert edge["kind"] == "resolved" and edge["count"] == 2
    assert edge["rcodes"] == '{"NOERROR": 2}'


def test_dot_keeps_every_hostile_name_inside_one_string() -> None:
    # Given a name made to break out of a DOT string
    dot = export(_graph(), "dot")
    # Then every line is one statement: strings are balanced and no raw newline leaked
    body = dot.splitlines()[2:-1]
    assert len(body) == len(_graph().nodes) + len(_graph().links)
    for line in body:
        without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', "S", line.strip())
        assert re.fullmatch(r"S( -> S)? \[label=S(, shape=\w+)?\];", without_strings), line


def test_json_export_is_the_graph_file() -> None:
    graph = _graph()
    assert Graph.model_validate_json(export(graph, "json")) == graph
