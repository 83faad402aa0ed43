"""The dependency graph: what a service asked DNS for, and what it connected to.

Stored as networkx node-link data (`nodes`, `links`) plus metadata, so any graph tool can
read graph.json, and typed here so every stage reads it the same way. Every name is text
chosen by whoever controls DNS: store it as received, never trust it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import networkx as nx
from pydantic import Field

from depdrill.artifact import Artifact, Frozen
from depdrill.discover.tls.model import ChainReport
from depdrill.netns import Target

Proto = Literal["tcp", "udp"]
SERVICE_ID = "service"


def resolver_id(address: str, port: int = 53) -> str:
    return f"resolver:{address}:{port}"


def name_id(name: str) -> str:
    return f"name:{name}"


def address_id(address: str) -> str:
    return f"address:{address}"


def endpoint_id(address: str, port: int, proto: str) -> str:
    return f"endpoint:{address}:{port}/{proto}"


class ServiceNode(Frozen):
    kind: Literal["service"] = "service"
    id: str = SERVICE_ID
    label: str


class ResolverNode(Frozen):
    kind: Literal["resolver"] = "resolver"
    id: str
    address: str
    port: int = 53
    transport: Literal["dns", "dot", "doh"] = "dns"


class NameNode(Frozen):
    kind: Literal["name"] = "name"
    id: str
    name: str  # as received, lower-cased, no trailing dot


class AddressNode(Frozen):
    kind: Literal["address"] = "address"
    id: str
    address: str
    family: Literal[4, 6]


class EndpointNode(Frozen):
    kind: Literal["endpoint"] = "endpoint"
    id: str
    address: str
    port: int
    proto: Proto
    tls: ChainReport | None = None


Node = Annotated[
    ServiceNode | ResolverNode | NameNode | AddressNode | EndpointNode,
    Field(discriminator="kind"),
]


class Seen(Frozen):
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None


class QueriesEdge(Seen):
    """service -> resolver: the service sent it queries."""

    kind: Literal["queries"] = "queries"
    source: str
    target: str
    transport: Literal["udp", "tcp"] = "udp"
    tcp_queries: int = 0  # of `count`, how many went over TCP (truncation retries, large answers)


class ResolvedEdge(Seen):
    """service -> name: the service looked this name up."""

    kind: Literal["resolved"] = "resolved"
    source: str
    target: str
    qtypes: list[str] = []
    rcodes: dict[str, int] = {}  # NOERROR: 12, NXDOMAIN: 1
    unanswered: int = 0
    truncated: int = 0  # UDP answers with the TC bit (the client should retry over TCP)
    # Search-path expansions folded into this name: `name.svc.cluster.local` asked (NXDOMAIN)
    # before `name` itself succeeded; `expansion_queries` is the lookups they cost.
    expansions: list[str] = []
    expansion_queries: int = 0


class CnameEdge(Frozen):
    """name -> name: an alias."""

    kind: Literal["cname"] = "cname"
    source: str
    target: str
    ttl: int = 0


class AnswerEdge(Frozen):
    """name -> address: an A or AAAA answer."""

    kind: Literal["answer"] = "answer"
    source: str
    target: str
    rtype: Literal["A", "AAAA"]
    ttl: int = 0


class ConnectsEdge(Seen):
    """service -> endpoint: flows the service opened (TCP SYNs, UDP flows)."""

    kind: Literal["connects"] = "connects"
    source: str
    target: str


class NamesEdge(Frozen):
    """endpoint -> name: how the endpoint got its name."""

    kind: Literal["names"] = "names"
    source: str
    target: str
    via: Literal["answer", "sni"]


Edge = Annotated[
    QueriesEdge | ResolvedEdge | CnameEdge | AnswerEdge | ConnectsEdge | NamesEdge,
    Field(discriminator="kind"),
]


class BlindSpotCode(StrEnum):
    ENCRYPTED_DNS = "encrypted-dns"  # DoT/DoH in use: names not visible
    UNANSWERED = "unanswered-queries"
    UNNAMED_FLOWS = "unnamed-flows"  # connections to addresses never resolved
    CAPTURE_DROPS = "capture-drops"
    MALFORMED = "malformed-dns"
    NXDOMAIN_STORM = "nxdomain-storm"
    AGGREGATED = "aggregated-names"  # too many names: folded under registered domains


class BlindSpot(Frozen):
    code: BlindSpotCode
    message: str
    count: int = 0
    examples: list[str] = []


class CaptureStats(Frozen):
    started: datetime
    ended: datetime
    interfaces: list[str] = []
    # How packets came in: "ebpf" (tcx programs, `ebpf_program` says what they keep),
    # "nflog" (nft rules in the namespace, `nft_ruleset`), "packet" (a packet socket,
    # `bpf_filter`); "" for a capture file. `tap_fallback`: why "auto" did not use the taps
    # before it ("ebpf: ...; nflog: ..."; a graph from before the ebpf tap gives nflog's
    # reason alone).
    tap: str = ""
    tap_fallback: str = ""
    bpf_filter: str = ""
    nft_ruleset: str = ""
    ebpf_program: str = ""
    packets: int = 0
    dns_messages: int = 0
    # Of `dns_messages`, the UDP exchanges (a question and its answer) the ebpf tap counted
    # in the kernel: byte for byte (the ID aside) repeats of one it had copied in full.
    dns_folded: int = 0
    malformed: int = 0
    kernel_drops: int = 0
    flows: int = 0


class Graph(Artifact):
    """depdrill.graph/v1: node-link data of the service's dependencies plus metadata."""

    KIND: ClassVar[str] = "graph"
    VERSION: ClassVar[int] = 1

    schema_: str = Field(default="depdrill.graph/v1", alias="schema")
    target: str  # how the service was reached: "netns lab-svc", "pcap capture.pcap"
    target_spec: Target | None = None
    capture: CaptureStats
    blind_spots: list[BlindSpot] = []
    directed: bool = True
    multigraph: bool = False
    nodes: list[Node]
    links: list[Edge]

    def node(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def to_networkx(self) -> nx.DiGraph[str]:
        graph: nx.DiGraph[str] = nx.DiGraph()
        for node in self.nodes:
            graph.add_node(node.id, **node.model_dump(mode="json", exclude={"id"}))
        for edge in self.links:
            attrs = edge.model_dump(mode="json", exclude={"source", "target"})
            graph.add_edge(edge.source, edge.target, **attrs)
        return graph

    def dependencies(self) -> list[Dependency]:
        return dependencies_of(self)

    def resolvers(self) -> list[ResolverNode]:
        return sorted((n for n in self.nodes if isinstance(n, ResolverNode)), key=lambda n: n.id)


class Endpoint(Frozen):
    address: str
    port: int
    proto: Proto
    tls: ChainReport | None = None
    flows: int = 0


class Dependency(Frozen):
    """A name the service looked up (after following CNAMEs) and what it reached through it."""

    name: str  # the name the service asked for
    canonical: str  # the end of the CNAME chain
    cnames: list[str] = []
    addresses: list[str] = []
    endpoints: list[Endpoint] = []
    queries: int = 0
    qtypes: list[str] = []
    rcodes: dict[str, int] = {}

    @property
    def reached(self) -> bool:
        return bool(self.endpoints)

    @property
    def ports(self) -> list[int]:
        return sorted({e.port for e in self.endpoints})

    @property
    def tls_endpoints(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.tls is not None]


def dependencies_of(graph: Graph) -> list[Dependency]:
    """Each name the service resolved, followed through CNAMEs to its addresses, with the
    endpoints the service reached on those addresses (or that SNI tied to the name); and each
    name only a TLS ClientHello gave (an address hard-coded or cached), with `queries` 0."""
    by_id = {n.id: n for n in graph.nodes}
    out: dict[str, list[Any]] = {}
    for edge in graph.links:
        out.setdefault(edge.source, []).append(edge)

    def follow(start: str) -> tuple[list[str], str, list[str]]:
        chain: list[str] = []
        seen = {start}
        current = start
        while True:
            nxt = [e.target for e in out.get(current, []) if isinstance(e, CnameEdge)]
            if not nxt or nxt[0] in seen:
                break
            current = nxt[0]
            seen.add(current)
            chain.append(current)
        addresses: set[str] = set()
        for node_id in [start, *chain]:
            for e in out.get(node_id, []):
                if isinstance(e, AnswerEdge):
                    addr = by_id.get(e.target)
                    if isinstance(addr, AddressNode):
                        addresses.add(addr.address)
        return chain, current, sorted(addresses)

    endpoint_names: dict[str, set[str]] = {}
    for edge in graph.links:
        if isinstance(edge, NamesEdge):
            endpoint_names.setdefault(edge.source, set()).add(edge.target)
    flows = {e.target: e.count for e in graph.links if isinstance(e, ConnectsEdge)}
    endpoints = [n for n in graph.nodes if isinstance(n, EndpointNode)]

    deps: list[Dependency] = []
    looked_up: set[str] = set()  # names, CNAME targets included, that some lookup accounts for
    for edge in graph.links:
        if not isinstance(edge, ResolvedEdge):
            continue
        node = by_id.get(edge.target)
        if not isinstance(node, NameNode):
            continue
        chain, canonical_id, addresses = follow(node.id)
        names = {node.id, *chain}
        looked_up |= names
        reached = [
            Endpoint(
                address=e.address, port=e.port, proto=e.proto, tls=e.tls, flows=flows.get(e.id, 0)
            )
            for e in endpoints
            if e.id in flows and (e.address in addresses or endpoint_names.get(e.id, set()) & names)
        ]
        canonical = by_id[canonical_id]
        deps.append(
            Dependency(
                name=node.name,
                canonical=canonical.name if isinstance(canonical, NameNode) else node.name,
                cnames=[by_id[c].name for c in chain if isinstance(by_id[c], NameNode)],  # type: ignore[union-attr]
                addresses=addresses,
                endpoints=sorted(reached, key=lambda e: (e.address, e.port, e.proto)),
                queries=edge.count,
                qtypes=sorted(edge.qtypes),
                rcodes=dict(sorted(edge.rcodes.items())),
            )
        )
    deps.extend(_sni_only(graph, by_id, flows, looked_up))
    return sorted(deps, key=lambda d: d.name)


def _sni_only(
    graph: Graph, by_id: dict[str, Node], flows: dict[str, int], looked_up: set[str]
) -> list[Dependency]:
    """Names no lookup accounts for, tied to reached endpoints by SNI alone."""
    reached: dict[str, list[Endpoint]] = {}
    for edge in graph.links:
        if not (isinstance(edge, NamesEdge) and edge.via == "sni") or edge.target in looked_up:
            continue
        endpoint, name = by_id.get(edge.source), by_id.get(edge.target)
        if not isinstance(endpoint, EndpointNode) or not isinstance(name, NameNode):
            continue
        if endpoint.id not in flows:
            continue
        reached.setdefault(name.name, []).append(
            Endpoint(
                address=endpoint.address, port=endpoint.port, proto=endpoint.proto,
                tls=endpoint.tls, flows=flows[endpoint.id],
            )
        )  # fmt: skip
    return [
        Dependency(
            name=name,
            canonical=name,
            endpoints=sorted(endpoints, key=lambda e: (e.address, e.port, e.proto)),
        )
        for name, endpoints in reached.items()
    ]
